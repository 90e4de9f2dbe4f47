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

Runtimes (``runtime``), the one seam between the two stacks:

``onnxruntime``
    The checkpoint's ``NAME.onnx`` graph in ONNX Runtime (:mod:`triage_core.runtime`), no torch
    imported: what ``triage serve``, ``triage worker`` and ``triage predict`` use by default. The
    graph returns the logits and the last feature map in one pass, so probabilities, the OOD
    score and the class activation map (:class:`triage_core.cam.FeatureCam`) come from it.
    ``mode`` does not apply (it reads ``"onnxruntime"``).
``torch``
    The safetensors weights in PyTorch, with the ``mode`` paths above: training, evaluation,
    the export's reference, and ``--runtime torch``.

Inputs are the ``(N, 3, S, S)`` float32 arrays of :func:`triage_core.imaging.to_array` (a
``torch.Tensor`` from ``to_tensor`` is accepted too); results are numpy arrays either way.

A :class:`Predictor` may be shared by several threads: forward passes are serialised by a lock
(either runtime already uses every core for one batch). With torch, ``threads`` calls
``torch.set_num_threads``, which is process-wide; with ONNX Runtime it is the session's
intra-op thread count.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.errors import SpecMismatchError
from triage_core.spec import CLASS_NAMES, Finding, ImageResult, ModelSpec

if TYPE_CHECKING:
    import torch

    from triage_core.cam import CamExplainer, FeatureCam
    from triage_core.runtime import OnnxModel, SessionOptions

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
    if not isinstance(logits, np.ndarray):  # a torch tensor
        logits = logits.detach().to("cpu").float().numpy()
    values = np.asarray(logits, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != spec.num_classes:
        raise ValueError(
            f"expected logits of shape (N, {spec.num_classes}), got {tuple(values.shape)}"
        )
    scaled = values / np.float32(spec.temperature)
    if spec.task == "multiclass":
        shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
    else:
        probs = np.where(
            scaled >= 0,
            1.0 / (1.0 + np.exp(-np.abs(scaled))),
            np.exp(-np.abs(scaled)) / (1.0 + np.exp(-np.abs(scaled))),
        )
    out: np.ndarray = np.asarray(probs, dtype=np.float32)
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
        One of :data:`MODES` (see the module docstring); torch runtime only.
    runtime : str
        ``"torch"`` (the default of the library: training, evaluation) or ``"onnxruntime"``
        (``NAME.onnx`` beside the checkpoint; what the serving commands use). ONNX Runtime
        needs ``checkpoint`` (or the default one), not ``model``.
    session : SessionOptions, optional
        ONNX Runtime session options; ``threads`` fills in their thread count when unset.

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
        runtime: str = "torch",
        session: SessionOptions | None = None,
    ) -> None:
        from triage_core import models
        from triage_core.runtime import RUNTIMES

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.runtime = runtime
        self.device: Any = "cpu"
        self.batch_size = batch_size
        self._lock = threading.RLock()
        self._onnx: OnnxModel | None = None
        self._torch_model: torch.nn.Module | None = None
        self._explainer: CamExplainer | FeatureCam | None = None
        self._compiled: Any = None
        self._compile_thread: threading.Thread | None = None
        self._compile_error: BaseException | None = None
        if runtime == "onnxruntime":
            if device != "cpu":
                raise ValueError(
                    f"the onnxruntime runtime runs on the CPU; for device {device!r} use "
                    "runtime torch"
                )
            self._init_onnx(checkpoint, model, threads, session)
            return
        import torch

        if threads is not None:
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
        kind = self.device.type if self.device.type in AUTO_MODE else "cpu"
        self.mode = AUTO_MODE[kind] if mode == "auto" else mode
        self._autocast = self.mode in ("bf16", "compile_bf16")
        self._channels_last = self.mode != "eager"
        model = model.to(self.device).eval()
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._torch_model = model
        logger.debug(
            "predictor %s: mode=%s device=%s batch_size=%d",
            self.spec.display_name,
            self.mode,
            self.device,
            batch_size,
        )

    def _init_onnx(
        self,
        checkpoint: str | Path | None,
        model: Any,
        threads: int | None,
        session: SessionOptions | None,
    ) -> None:
        from dataclasses import replace

        from triage_core import models
        from triage_core.runtime import OnnxModel, SessionOptions

        if model is not None:
            raise ValueError("the onnxruntime runtime loads a checkpoint, not a torch model")
        path = Path(checkpoint) if checkpoint is not None else models.default_checkpoint_path()
        spec = models.read_spec(path)
        if spec.class_names != CLASS_NAMES:  # as models.load_checkpoint refuses them
            raise SpecMismatchError(
                "class_names", f"checkpoint has {list(spec.class_names)}, expected {CLASS_NAMES}"
            )
        options = session or SessionOptions()
        if options.threads is None and threads is not None:
            options = replace(options, threads=threads)
        self._onnx = OnnxModel(path, spec, options)
        self.checkpoint = path
        self.spec = spec
        self.mode = "onnxruntime"
        logger.info("loaded model %s from %s (ONNX Runtime)", spec.display_name, self._onnx.path)

    @property
    def model(self) -> torch.nn.Module:
        """The torch module (torch runtime only)."""
        if self._torch_model is None:
            raise RuntimeError("this Predictor runs ONNX Runtime: it has no torch module")
        return self._torch_model

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

        started = time.perf_counter()
        size = self.spec.input_size
        if self._onnx is not None:
            with self._lock:
                self._onnx.run(np.zeros((1, 3, size, size), dtype=np.float32))
            return
        import torch

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

    def _check_batch(self, batch: Any) -> None:
        size = self.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a (N, 3, {size}, {size}) batch, got {tuple(batch.shape)}")

    def _run_onnx(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Logits and features of the whole batch, ``batch_size`` at a time (lock held)."""
        assert self._onnx is not None
        x = np.asarray(batch, dtype=np.float32)
        logits, features = [], []
        for start in range(0, x.shape[0], self.batch_size):
            part_logits, part_features = self._onnx.run(x[start : start + self.batch_size])
            logits.append(part_logits)
            features.append(part_features)
        return np.concatenate(logits), np.concatenate(features)

    def predict_logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw logits ``(N, C)`` (float32, before temperature) for a ``(N, 3, S, S)`` batch."""
        self._check_batch(batch)
        if batch.shape[0] == 0:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        if self._onnx is not None:
            with self._lock:
                return self._run_onnx(batch)[0]
        import torch

        tensors = torch.as_tensor(batch)
        parts = []
        with self._lock:
            for start in range(0, tensors.shape[0], self.batch_size):
                parts.append(self._forward(tensors[start : start + self.batch_size]))
        out: np.ndarray = torch.cat(parts).numpy()
        return out

    def predict_tensors(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` for a ``(N, 3, S, S)`` batch from ``to_array``.

        Parameters
        ----------
        batch : numpy.ndarray or torch.Tensor
            Preprocessed inputs (``triage_core.imaging.to_array``), ``S = spec.input_size``.

        Returns
        -------
        numpy.ndarray
            float32 probabilities in ``spec.class_names`` order.
        """
        logits = self.predict_logits(batch)
        if logits.shape[0] == 0:
            return logits
        return calibrate(logits, self.spec)

    def predict_with_features(
        self, batch: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Like :meth:`predict_tensors`, plus the Grad-CAM target layer's activations.

        The activations are captured by a forward hook during the same pass (no second forward),
        for :meth:`CamExplainer.map_from_features <triage_core.cam.CamExplainer.map_from_features>`.

        Returns
        -------
        probabilities : numpy.ndarray
            ``(N, C)`` float32, exactly what :meth:`predict_tensors` returns.
        features : numpy.ndarray or None
            ``(N, K, h, w)`` float32 activations (ONNX Runtime: the graph's second output);
            ``None`` when the compiled module served the call (its graph runs no Python hooks)
            or the hook did not see every image.
        """
        if self._onnx is not None:
            self._check_batch(batch)
            if batch.shape[0] == 0:
                return np.zeros((0, self.spec.num_classes), dtype=np.float32), None
            with self._lock:
                logits, features = self._run_onnx(batch)
            return calibrate(logits, self.spec), features
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

    def ood_scores(self, batch: np.ndarray | torch.Tensor) -> np.ndarray | None:
        """Out-of-distribution scores ``(N,)`` (:mod:`triage_core.ood`) for a ``(N, 3, S, S)``
        batch, or ``None`` when the checkpoint has no OOD reference. Runs the fp32 model (one
        forward pass); :meth:`predict_with_features` gives the same scores' inputs for free."""
        from triage_core import ood

        if not self.spec.ood:
            return None
        if self._onnx is not None:
            _, features = self.predict_with_features(batch)
            return None if features is None else ood.scores_from_features(self.spec, features)
        import torch

        with self._lock:
            pooled = ood.pooled_features(
                self.model, self.spec, torch.as_tensor(batch), self.batch_size
            )
        return ood.scores_from_features(self.spec, pooled)

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` for display-ready ``H x W`` images in [0, 1].

        Each image goes through ``imaging.to_array`` (letterbox to the checkpoint's input
        size, mean/std) first.
        """
        from triage_core.imaging import to_array

        if len(images) == 0:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        return self.predict_tensors(np.stack([to_array(img, self.spec) for img in images]))

    # -- explanations ------------------------------------------------------------------------

    def explainer(self) -> CamExplainer | FeatureCam:
        """The explainer of this model (built once).

        ONNX Runtime: a :class:`~triage_core.cam.FeatureCam` (class activation map from the
        graph's feature map and the head weights in its metadata, numpy only). torch: a
        Grad-CAM explainer over a private fp32 copy of the model, which keeps Grad-CAM's hooks
        and gradients away from the model that serves predictions.
        """
        from triage_core.cam import CamExplainer, FeatureCam

        with self._lock:
            if self._explainer is None:
                if self._onnx is not None:
                    onnx = self._onnx
                    self._explainer = FeatureCam(
                        self.spec,
                        onnx.head_weight,
                        lambda x: self.predict_with_features(x)[1],
                    )
                else:
                    self._explainer = CamExplainer(self.model, self.spec, device=self.device)
            return self._explainer

    def to_dict(self) -> dict[str, Any]:
        """Identity for logs and reports."""
        return {
            "name": self.spec.name or self.spec.arch,
            "version": self.spec.version,
            "arch": self.spec.arch,
            "runtime": self.runtime,
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
