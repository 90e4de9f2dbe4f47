"""Batched, calibrated inference: :class:`Predictor`, and its public surface.

:class:`Predictor` wraps one checkpoint (``NAME.safetensors`` + ``NAME.json``, see
:mod:`triage_core.models`). It splits its input into batches of ``batch_size``, serialises the
forward passes, and returns calibrated probabilities (:func:`calibrate`: the checkpoint's
``temperature``, then a softmax over classes for ``task="multiclass"`` or one sigmoid per class
for ``task="multilabel"``). What it delegates, one module per job:

* running the model: a *runtime*, chosen once by :func:`load_runtime` (the one seam between the
  two stacks):

  ``onnxruntime``
      The checkpoint's ``NAME.onnx`` graph in ONNX Runtime (:class:`triage_core.runtime.
      OnnxModel`), no torch imported: what ``triage serve``, ``triage worker`` and ``triage
      predict`` use by default. The graph returns the logits and the last feature map in one
      pass, so probabilities, the OOD score and the class activation map come from it. ``mode``
      does not apply (it reads ``"onnxruntime"``).
  ``torch``
      The safetensors weights in PyTorch (:class:`triage_core.torch_runtime.TorchModel`), with
      its execution paths (:data:`MODES`: eager, channels-last, bf16, ``torch.compile``):
      training, evaluation, the export's reference, and ``--runtime torch``;

* calibration: :func:`triage_core.calibration.calibrate`;
* study-level findings: :func:`triage_core.aggregation.aggregate_study`;
* explanations: :meth:`Predictor.explainer`, the runtime's CAM (:mod:`triage_core.cam`);
* the out-of-distribution score: :mod:`triage_core.ood`.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from triage_core.aggregation import aggregate_study
from triage_core.calibration import calibrate
from triage_core.spec import ModelSpec
from triage_core.torch_runtime import AUTO_MODE, MODES, TorchModel

if TYPE_CHECKING:
    import torch

    from triage_core.cam import CamExplainer, FeatureCam
    from triage_core.runtime import SessionOptions

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_MODE",
    "MODES",
    "InferenceRuntime",
    "Predictor",
    "aggregate_study",
    "calibrate",
    "load_runtime",
]


class InferenceRuntime(Protocol):
    """What a :class:`Predictor` needs of a runtime (one batch per call; the caller locks)."""

    spec: ModelSpec
    runtime: str
    mode: str

    @property
    def device(self) -> Any:
        """Where the model runs (``"cpu"`` or a ``torch.device``)."""

    def forward(self, batch: Any, with_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits ``(N, C)`` and, when available, the feature map ``(N, K, h, w)``."""

    def ood_features(self, batch: Any) -> np.ndarray:
        """Features for :func:`triage_core.ood.scores_from_features` (pooled or not)."""

    def explainer(
        self, features_of: Callable[[np.ndarray], np.ndarray | None]
    ) -> CamExplainer | FeatureCam:
        """The CAM explainer of this model."""


def load_runtime(
    checkpoint: str | Path | None = None,
    *,
    model: torch.nn.Module | None = None,
    spec: ModelSpec | None = None,
    runtime: str = "torch",
    device: str = "cpu",
    threads: int | None = None,
    batch_size: int = 16,
    mode: str = "auto",
    session: SessionOptions | None = None,
) -> tuple[InferenceRuntime, Path | None]:
    """The runtime that runs a checkpoint (or an already built torch ``model``), and the
    checkpoint's path (``None`` for a ``model``). Arguments as for :class:`Predictor`.

    Raises
    ------
    CheckpointError
        Missing or invalid checkpoint.
    ValueError
        Invalid combination (``model`` with ONNX Runtime or with ``checkpoint``, ``model``
        without ``spec``, ONNX Runtime on another device than the CPU).
    """
    from triage_core import models
    from triage_core.runtime import RUNTIMES, OnnxModel

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    if runtime == "onnxruntime":
        if device != "cpu":
            raise ValueError(
                f"the onnxruntime runtime runs on the CPU; for device {device!r} use runtime torch"
            )
        if model is not None:
            raise ValueError("the onnxruntime runtime loads a checkpoint, not a torch model")
        path = Path(checkpoint) if checkpoint is not None else models.default_checkpoint_path()
        return OnnxModel.load(path, session, threads), path
    options: dict[str, Any] = {
        "device": device,
        "mode": mode,
        "batch_size": batch_size,
        "threads": threads,
    }
    if model is not None:
        if checkpoint is not None:
            raise ValueError("pass either checkpoint or model, not both")
        if spec is None:
            raise ValueError("a model needs its ModelSpec (spec=...)")
        return TorchModel(model, spec, **options), None
    path = Path(checkpoint) if checkpoint is not None else models.default_checkpoint_path()
    return TorchModel.load(path, **options), path


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
        One of :data:`MODES` (see :mod:`triage_core.torch_runtime`); torch runtime only.
    runtime : str
        ``"torch"`` (the default of the library: training, evaluation) or ``"onnxruntime"``
        (``NAME.onnx`` beside the checkpoint; what the serving commands use). ONNX Runtime
        needs ``checkpoint`` (or the default one), not ``model``.
    session : SessionOptions, optional
        ONNX Runtime session options; ``threads`` fills in their thread count when unset.

    Attributes
    ----------
    backend : InferenceRuntime
        The runtime (:class:`~triage_core.runtime.OnnxModel` or
        :class:`~triage_core.torch_runtime.TorchModel`).

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
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.backend, self.checkpoint = load_runtime(
            checkpoint,
            model=model,
            spec=spec,
            runtime=runtime,
            device=device,
            threads=threads,
            batch_size=batch_size,
            mode=mode,
            session=session,
        )
        self.runtime = runtime
        self.spec: ModelSpec = self.backend.spec
        self.mode: str = self.backend.mode
        self.device: Any = self.backend.device
        self.batch_size = batch_size
        self._lock = threading.RLock()
        self._explainer: CamExplainer | FeatureCam | None = None
        self._compile_thread: threading.Thread | None = None
        logger.debug(
            "predictor %s: runtime=%s mode=%s device=%s batch_size=%d",
            self.spec.display_name,
            runtime,
            self.mode,
            self.device,
            batch_size,
        )

    @property
    def model(self) -> torch.nn.Module:
        """The torch module (torch runtime only)."""
        if not isinstance(self.backend, TorchModel):
            raise RuntimeError("this Predictor runs ONNX Runtime: it has no torch module")
        return self.backend.model

    @property
    def compiled_ready(self) -> bool:
        """Whether the compiled module serves calls (always ``False`` outside compile modes)."""
        return isinstance(self.backend, TorchModel) and self.backend.compiled_ready

    def warmup(self, background: bool = False) -> threading.Thread | None:
        """Compile (compile modes) or run one forward pass.

        Parameters
        ----------
        background : bool
            Do it in a daemon thread and return it; calls made meanwhile use the
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
        if isinstance(self.backend, TorchModel) and self.backend.compiles:
            self.backend.compile()  # outside the lock: calls go on meanwhile
            return
        size = self.spec.input_size
        with self._lock:
            self.backend.forward(np.zeros((1, 3, size, size), dtype=np.float32), False)

    # -- inference ---------------------------------------------------------------------------

    def _check_batch(self, batch: Any) -> None:
        size = self.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a (N, 3, {size}, {size}) batch, got {tuple(batch.shape)}")

    def _run(self, batch: Any, with_features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits of the whole batch, ``batch_size`` at a time, and the features when every
        part had them."""
        self._check_batch(batch)
        if batch.shape[0] == 0:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32), None
        logits: list[np.ndarray] = []
        features: list[np.ndarray | None] = []
        with self._lock:  # one pass at a time; a feature hook only sees this call's batches
            for start in range(0, batch.shape[0], self.batch_size):
                part = self.backend.forward(batch[start : start + self.batch_size], with_features)
                logits.append(part[0])
                features.append(part[1])
        kept = [f for f in features if f is not None]
        joined = np.concatenate(kept) if with_features and len(kept) == len(features) else None
        return np.concatenate(logits), joined

    def predict_logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw logits ``(N, C)`` (float32, before temperature) for a ``(N, 3, S, S)`` batch."""
        return self._run(batch, with_features=False)[0]

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
        """Like :meth:`predict_tensors`, plus the CAM target layer's activations.

        The activations come from the same pass (ONNX Runtime: the graph's second output;
        torch: a forward hook), for the explainer's ``map_from_features``.

        Returns
        -------
        probabilities : numpy.ndarray
            ``(N, C)`` float32, exactly what :meth:`predict_tensors` returns.
        features : numpy.ndarray or None
            ``(N, K, h, w)`` float32 activations; ``None`` when the compiled module served the
            call (its graph runs no Python hooks) or the hook did not see every image.
        """
        logits, features = self._run(batch, with_features=True)
        if logits.shape[0] == 0:
            return logits, None
        return calibrate(logits, self.spec), features

    def ood_scores(self, batch: np.ndarray | torch.Tensor) -> np.ndarray | None:
        """Out-of-distribution scores ``(N,)`` (:mod:`triage_core.ood`) for a ``(N, 3, S, S)``
        batch, or ``None`` when the checkpoint has no OOD reference. Runs the fp32 model (one
        forward pass); :meth:`predict_with_features` gives the same scores' inputs for free."""
        from triage_core import ood

        if not self.spec.ood:
            return None
        with self._lock:
            parts = [
                self.backend.ood_features(batch[start : start + self.batch_size])
                for start in range(0, batch.shape[0], self.batch_size)
            ]
        if not parts:
            return np.zeros((0,), dtype=np.float32)
        return ood.scores_from_features(self.spec, np.concatenate(parts))

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
        with self._lock:
            if self._explainer is None:
                self._explainer = self.backend.explainer(lambda x: self.predict_with_features(x)[1])
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
