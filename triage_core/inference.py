"""Batched, calibrated inference and study-level aggregation.

:class:`Predictor` wraps one checkpoint (``NAME.safetensors`` + ``NAME.json``, see
:mod:`triage_core.models`). It always runs the model in ``eval`` mode under
``torch.inference_mode``, splits its input into batches of ``batch_size``, divides the logits by
the checkpoint's ``temperature`` and returns calibrated probabilities: a softmax over classes for
``task="multiclass"``, one sigmoid per class for ``task="multilabel"``.

Execution paths (``mode``), measured by ``benchmarks/bench_core.py``:

``eager``
    fp32, contiguous (NCHW) memory layout: the reference.
``channels_last``
    fp32 with the model and inputs in channels-last (NHWC) layout (oneDNN's preferred layout).
``bf16``
    channels-last plus ``torch.autocast(dtype=torch.bfloat16)``; logits are cast back to fp32
    before calibration.
``compile`` / ``compile_bf16``
    ``torch.compile`` (inductor, weight freezing) over the channels-last model, optionally with
    bf16 autocast. Compiling costs ~20 s per batch shape the first time, so until
    :meth:`Predictor.warmup` has finished, calls are served by the ``channels_last`` /
    ``bf16`` path: a C-STORE response never waits on a compiler.
``auto``
    The default: ``channels_last`` (fp32) on a CPU and on CUDA. On this project's 2-core CPU it
    was 1.3-1.4x faster than eager with identical probabilities. ``bf16`` is 1.6-2x faster and
    its probabilities stay within 0.01 of fp32, but on a trained checkpoint whose
    probabilities sit close to the operating thresholds it flipped present/absent decisions
    (8 of 192 on 64 NIH images; on the EfficientNet-Lite0 default 4 of 48 on 16 images, max
    drift 0.29), so it is opt-in (``benchmarks/bench_core.py`` reports both the drift and the
    flips). Static int8 (``bench_core.py --int8``) was tried on Lite0 and not adopted: test
    AUROC moved by up to 0.14 and 28 % of the decisions flipped.

A :class:`Predictor` may be shared by several threads: forward passes are serialised by a lock
(PyTorch already uses every core for one batch). ``threads`` calls ``torch.set_num_threads``,
which is process-wide.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.spec import Finding, ImageResult, ModelSpec

if TYPE_CHECKING:
    import torch

    from triage_core.cam import CamExplainer

logger = logging.getLogger(__name__)

#: Execution paths a :class:`Predictor` can take (``auto`` picks one per device).
MODES: tuple[str, ...] = ("auto", "eager", "channels_last", "bf16", "compile", "compile_bf16")
#: What ``mode="auto"`` means on a CPU and on CUDA.
AUTO_MODE: dict[str, str] = {"cpu": "channels_last", "cuda": "channels_last"}


def calibrate(logits: np.ndarray | torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """Calibrated probabilities from raw logits: ``softmax`` or ``sigmoid`` of ``logits / T``.

    Parameters
    ----------
    logits : array or tensor, shape (N, C)
        Raw model outputs.
    spec : ModelSpec
        Supplies ``temperature`` and ``task``.

    Returns
    -------
    numpy.ndarray
        ``(N, C)`` float32 probabilities.
    """
    import torch

    values = torch.as_tensor(logits).detach().to("cpu", torch.float32)
    if values.ndim != 2 or values.shape[1] != spec.num_classes:
        raise ValueError(
            f"expected logits of shape (N, {spec.num_classes}), got {tuple(values.shape)}"
        )
    scaled = values / float(spec.temperature)
    probs = scaled.softmax(dim=1) if spec.task == "multiclass" else scaled.sigmoid()
    out: np.ndarray = probs.numpy().astype(np.float32, copy=False)
    return out


class Predictor:
    """Calibrated per-class probabilities for batches of images.

    Parameters
    ----------
    checkpoint : str or Path, optional
        Checkpoint name (``NAME`` for ``NAME.safetensors`` + ``NAME.json``). When neither
        ``checkpoint`` nor ``model`` is given, the default checkpoint shipped with the package
        is used (``models.default_checkpoint_path()``, which raises ``CheckpointError`` when
        this installation has none).
    model : torch.nn.Module, optional
        An already built model (tests, benchmarks, training loops); requires ``spec``. The
        module is put in eval mode and, for the channels-last paths, converted in place.
    spec : ModelSpec, optional
        The model's spec (required with ``model``; ignored with ``checkpoint``).
    device : str
        ``"cpu"`` or a CUDA device such as ``"cuda"`` / ``"cuda:0"``.
    threads : int, optional
        ``torch.set_num_threads(threads)`` (process-wide); ``None`` leaves it unchanged.
    batch_size : int
        Largest batch run at once.
    mode : str
        One of :data:`MODES` (see the module docstring).

    Raises
    ------
    CheckpointError
        Missing or invalid checkpoint.
    ValueError
        Invalid arguments (unknown mode, ``model`` without ``spec``, non-positive sizes).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        spec: ModelSpec | None = None,
        device: str = "cpu",
        threads: int | None = None,
        batch_size: int = 16,
        mode: str = "auto",
    ) -> None:
        import torch

        from triage_core import models

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if model is not None:
            if checkpoint is not None:
                raise ValueError("pass either checkpoint or model, not both")
            if spec is None:
                raise ValueError("a model needs its ModelSpec (spec=...)")
            self.checkpoint: Path | None = None
        else:
            path = Path(checkpoint) if checkpoint is not None else models.default_checkpoint_path()
            model, spec = models.load_checkpoint(path, map_location="cpu")
            self.checkpoint = path
            logger.info("loaded model %s from %s", spec.display_name, path)
        assert spec is not None  # for mypy: checked above
        self.spec: ModelSpec = spec
        self.batch_size = batch_size
        kind = self.device.type if self.device.type in AUTO_MODE else "cpu"
        self.mode = AUTO_MODE[kind] if mode == "auto" else mode
        self._autocast = self.mode in ("bf16", "compile_bf16")
        self._channels_last = self.mode != "eager"
        model = model.to(self.device).eval()
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = model
        self._lock = threading.RLock()
        self._compiled: Any = None
        self._compile_thread: threading.Thread | None = None
        self._compile_error: BaseException | None = None
        self._explainer: CamExplainer | None = None
        logger.debug(
            "predictor %s: mode=%s device=%s batch_size=%d",
            self.spec.display_name,
            self.mode,
            self.device,
            batch_size,
        )

    # -- compile support ---------------------------------------------------------------------

    @property
    def compiled_ready(self) -> bool:
        """Whether the compiled module serves calls (always ``False`` outside compile modes)."""
        return self._compiled is not None

    def _compile_shapes(self) -> list[int]:
        return sorted({1, self.batch_size})

    def warmup(self, background: bool = False) -> threading.Thread | None:
        """Compile (compile modes) and run one forward per batch shape.

        Parameters
        ----------
        background : bool
            Compile in a daemon thread and return it; calls made meanwhile use the
            non-compiled channels-last path.

        Returns
        -------
        threading.Thread or None
            The background thread, if one was started.
        """
        if background:
            thread = threading.Thread(target=self._warmup, name="predictor-warmup", daemon=True)
            self._compile_thread = thread
            thread.start()
            return thread
        self._warmup()
        return None

    def _warmup(self) -> None:
        import time

        import torch

        started = time.perf_counter()
        size = self.spec.input_size
        if not self.mode.startswith("compile"):
            with self._lock:
                self._forward(torch.zeros(1, 3, size, size), use_compiled=False)
            return
        try:
            compiled = torch.compile(self.model, dynamic=False, options={"freezing": True})
            for n in self._compile_shapes():
                batch = torch.zeros(n, 3, size, size, device=self.device)
                batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), self._autocast_context():
                    compiled(batch)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: keep the eager path
            self._compile_error = exc
            logger.warning("torch.compile failed, serving the non-compiled path: %s", exc)
            return
        self._compiled = compiled
        logger.info(
            "compiled %s for batch shapes %s in %.1f s",
            self.spec.display_name,
            self._compile_shapes(),
            time.perf_counter() - started,
        )

    # -- inference ---------------------------------------------------------------------------

    def _autocast_context(self) -> Any:
        import contextlib

        import torch

        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _forward(self, batch: torch.Tensor, use_compiled: bool = True) -> torch.Tensor:
        """Logits (fp32, on the CPU) for one batch; the caller holds the lock."""
        import torch

        batch = batch.to(self.device, torch.float32, non_blocking=True)
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        n = batch.shape[0]
        module: Any = self.model
        if use_compiled and self._compiled is not None:
            module = self._compiled
            target = 1 if n == 1 else self.batch_size
            if n < target:  # pad to a compiled shape: no recompilation on odd batch sizes
                pad = batch.new_zeros((target - n, *batch.shape[1:]))
                batch = torch.cat([batch, pad]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast_context():
            logits = module(batch)
        return logits[:n].float().cpu()

    def predict_logits(self, batch: torch.Tensor) -> np.ndarray:
        """Raw logits ``(N, C)`` (float32, before temperature) for ``(N, 3, S, S)`` tensors."""
        import torch

        size = self.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a (N, 3, {size}, {size}) tensor, got {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        parts = []
        with self._lock:
            for start in range(0, batch.shape[0], self.batch_size):
                parts.append(self._forward(batch[start : start + self.batch_size]))
        out: np.ndarray = torch.cat(parts).numpy()
        return out

    def predict_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` for a ``(N, 3, S, S)`` batch from ``to_tensor``.

        Parameters
        ----------
        batch : torch.Tensor
            Preprocessed inputs (``triage_core.imaging.to_tensor``), ``S = spec.input_size``.

        Returns
        -------
        numpy.ndarray
            float32 probabilities in ``spec.class_names`` order.
        """
        logits = self.predict_logits(batch)
        if logits.shape[0] == 0:
            return logits
        return calibrate(logits, self.spec)

    def predict_with_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Like :meth:`predict_tensors`, plus the Grad-CAM target layer's activations.

        The activations are captured by a forward hook during the same pass (no second forward),
        for :meth:`CamExplainer.map_from_features <triage_core.cam.CamExplainer.map_from_features>`.

        Returns
        -------
        probabilities : numpy.ndarray
            ``(N, C)`` float32, exactly what :meth:`predict_tensors` returns.
        features : numpy.ndarray or None
            ``(N, K, h, w)`` float32 activations; ``None`` when the compiled module served the
            call (its graph runs no Python hooks) or the hook did not see every image.
        """
        import torch

        from triage_core.models import cam_target_layers

        layers = cam_target_layers(self.model, self.spec.arch)
        captured: list[torch.Tensor] = []

        def keep(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            captured.append(output.detach().float().cpu())

        with self._lock:  # the hook must only see this call's batches
            if self._compiled is not None:  # no hooks on a compiled graph (nor a recompile)
                return self.predict_tensors(batch), None
            handle = layers[0].register_forward_hook(keep)
            try:
                probs = self.predict_tensors(batch)
            finally:
                handle.remove()
        if len(layers) != 1 or not captured or sum(c.shape[0] for c in captured) != len(probs):
            return probs, None
        features = np.ascontiguousarray(torch.cat(captured).numpy(), dtype=np.float32)
        return probs, features

    def ood_scores(self, batch: torch.Tensor) -> np.ndarray | None:
        """Out-of-distribution scores ``(N,)`` (:mod:`triage_core.ood`) for a ``(N, 3, S, S)``
        batch, or ``None`` when the checkpoint has no OOD reference. Runs the fp32 model (one
        forward pass); :meth:`predict_with_features` gives the same scores' inputs for free."""
        from triage_core import ood

        if not self.spec.ood:
            return None
        with self._lock:
            pooled = ood.pooled_features(self.model, self.spec, batch, self.batch_size)
        return ood.scores_from_features(self.spec, pooled)

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` for display-ready ``H x W`` images in [0, 1].

        Each image goes through ``imaging.to_tensor`` (letterbox to the checkpoint's input
        size, mean/std) first.
        """
        import torch

        from triage_core.imaging import to_tensor

        if len(images) == 0:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        return self.predict_tensors(torch.stack([to_tensor(img, self.spec) for img in images]))

    # -- explanations ------------------------------------------------------------------------

    def explainer(self) -> CamExplainer:
        """A Grad-CAM explainer over a private fp32 copy of this model (built once).

        The copy keeps Grad-CAM's hooks and gradients away from the model that serves
        predictions, so explanations and predictions may run in different threads.
        """
        from triage_core.cam import CamExplainer

        with self._lock:
            if self._explainer is None:
                self._explainer = CamExplainer(self.model, self.spec, device=self.device)
            return self._explainer

    def to_dict(self) -> dict[str, Any]:
        """Identity for logs and reports."""
        return {
            "name": self.spec.name or self.spec.arch,
            "version": self.spec.version,
            "arch": self.spec.arch,
            "mode": self.mode,
            "device": str(self.device),
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
        }


def aggregate_study(images: Sequence[ImageResult], spec: ModelSpec) -> tuple[Finding, ...]:
    """Study-level findings: per class, the maximum probability over the eligible images.

    Parameters
    ----------
    images : sequence of ImageResult
        Per-image results; images that are not eligible, carry an ``error`` or have no
        probabilities are ignored.
    spec : ModelSpec
        Class names and per-class operating thresholds.

    Returns
    -------
    tuple of Finding
        One finding per class, in ``spec.class_names`` order, each remembering the image
        (``source_uid``) that gave its probability (the first such image on ties); empty when
        no image was usable.
    """
    usable = [im for im in images if im.eligible and not im.error and im.probabilities]
    if not usable:
        return ()
    findings = []
    for name, threshold in zip(spec.class_names, spec.thresholds, strict=True):
        best: ImageResult | None = None
        best_p = -1.0
        for image in usable:
            if name not in image.probabilities:
                raise ValueError(f"image {image.uid} has no probability for {name!r}")
            p = float(image.probabilities[name])
            if p > best_p:
                best, best_p = image, p
        assert best is not None
        findings.append(
            Finding(
                name=name,
                probability=best_p,
                threshold=float(threshold),
                present=best_p >= float(threshold),
                source_uid=best.uid,
            )
        )
    return tuple(findings)
