"""The torch runtime of :class:`~triage_core.inference.Predictor`: a checkpoint's safetensors
weights in PyTorch, for training, evaluation, the ONNX export's reference and ``--runtime torch``.

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
    :meth:`TorchModel.compile` has finished (``Predictor.warmup``), calls are served by the
    ``channels_last`` / ``bf16`` path: a C-STORE response never waits on a compiler.
``auto``
    The default: ``channels_last`` (fp32) on a CPU and on CUDA. On this project's 2-core CPU it
    was 1.3-1.4x faster than eager with identical probabilities. ``bf16`` is 1.6-2x faster and
    its probabilities stay within 0.01 of fp32, but on a trained checkpoint whose
    probabilities sit close to the operating thresholds it flipped present/absent decisions
    (8 of 192 on 64 NIH images; on the EfficientNet-Lite0 default 4 of 48 on 16 images, max
    drift 0.29), so it is opt-in (``benchmarks/bench_core.py`` reports both the drift and the
    flips). Static int8 (``bench_core.py --int8``) was tried on Lite0 and not adopted: test
    AUROC moved by up to 0.14 and 28 % of the decisions flipped.

This module imports torch only inside its functions, so importing it (as
:mod:`triage_core.inference` does) costs nothing on a node that serves with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.spec import ModelSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from triage_core.cam import CamExplainer

logger = logging.getLogger(__name__)

__all__ = ["AUTO_MODE", "MODES", "TorchModel"]

#: Execution paths a :class:`TorchModel` can take (``auto`` picks one per device).
MODES: tuple[str, ...] = ("auto", "eager", "channels_last", "bf16", "compile", "compile_bf16")
#: What ``mode="auto"`` means on a CPU and on CUDA.
AUTO_MODE: dict[str, str] = {"cpu": "channels_last", "cuda": "channels_last"}


class TorchModel:
    """A torch classifier prepared for inference in one of :data:`MODES`.

    It runs one batch at a time and keeps no lock: :class:`~triage_core.inference.Predictor`
    splits the input into batches and serialises the calls.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier; put in eval mode, moved to ``device`` and, for every mode but
        ``eager``, converted to channels-last in place.
    spec : ModelSpec
        Its spec.
    device : str
        ``"cpu"`` or a CUDA device such as ``"cuda"`` / ``"cuda:0"``.
    mode : str
        One of :data:`MODES`.
    batch_size : int
        The largest batch a caller passes (a compiled module is compiled for 1 and this size).
    threads : int, optional
        ``torch.set_num_threads(threads)`` (process-wide); ``None`` leaves it unchanged.

    Raises
    ------
    ValueError
        Unknown mode.
    """

    runtime = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        *,
        device: str = "cpu",
        mode: str = "auto",
        batch_size: int = 16,
        threads: int | None = None,
    ) -> None:
        import torch

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = torch.device(device)
        self.batch_size = batch_size
        kind = self.device.type if self.device.type in AUTO_MODE else "cpu"
        self.mode = AUTO_MODE[kind] if mode == "auto" else mode
        self._autocast = self.mode in ("bf16", "compile_bf16")
        self._channels_last = self.mode != "eager"
        model = model.to(self.device).eval()
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = model
        self._compiled: Any = None
        self.compile_error: BaseException | None = None
        self._layers: list[torch.nn.Module] | None = None

    @classmethod
    def load(cls, checkpoint: Path, **options: Any) -> TorchModel:
        """The model of checkpoint ``NAME`` (``NAME.safetensors`` + ``NAME.json``); ``options``
        are the keyword arguments of the constructor.

        Raises
        ------
        CheckpointError
            Missing or invalid checkpoint.
        """
        from triage_core import models

        model, spec = models.load_checkpoint(checkpoint, map_location="cpu")
        logger.info("loaded model %s from %s", spec.display_name, checkpoint)
        return cls(model, spec, **options)

    # -- compile support ---------------------------------------------------------------------

    @property
    def compiles(self) -> bool:
        """Whether the mode compiles (``compile`` / ``compile_bf16``)."""
        return self.mode.startswith("compile")

    @property
    def compiled_ready(self) -> bool:
        """Whether the compiled module serves calls (always ``False`` outside compile modes)."""
        return self._compiled is not None

    def compile_shapes(self) -> list[int]:
        """The batch sizes a compiled module is compiled for."""
        return sorted({1, self.batch_size})

    def compile(self) -> None:
        """Compile the model for :meth:`compile_shapes` (compile modes; takes seconds).

        Calls made meanwhile run the non-compiled path; a compiler failure is logged, kept in
        ``compile_error`` and leaves that path serving.
        """
        import torch

        started = time.perf_counter()
        size = self.spec.input_size
        try:
            compiled = torch.compile(self.model, dynamic=False, options={"freezing": True})
            for n in self.compile_shapes():
                batch = torch.zeros(n, 3, size, size, device=self.device)
                batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), self._autocast_context():
                    compiled(batch)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: keep the eager path
            self.compile_error = exc
            logger.warning("torch.compile failed, serving the non-compiled path: %s", exc)
            return
        self._compiled = compiled
        logger.info(
            "compiled %s for batch shapes %s in %.1f s",
            self.spec.display_name,
            self.compile_shapes(),
            time.perf_counter() - started,
        )

    # -- inference ---------------------------------------------------------------------------

    def _autocast_context(self) -> Any:
        import torch

        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (fp32, on the CPU) for one batch of at most ``batch_size`` images."""
        import torch

        batch = batch.to(self.device, torch.float32, non_blocking=True)
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        n = batch.shape[0]
        module: Any = self.model
        if self._compiled is not None:
            module = self._compiled
            target = 1 if n == 1 else self.batch_size
            if n < target:  # pad to a compiled shape: no recompilation on odd batch sizes
                pad = batch.new_zeros((target - n, *batch.shape[1:]))
                batch = torch.cat([batch, pad]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast_context():
            logits = module(batch)
        return logits[:n].float().cpu()

    def forward(
        self, batch: np.ndarray | torch.Tensor, with_features: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits ``(N, C)`` of one batch and, with ``with_features``, the Grad-CAM target
        layer's activations ``(N, K, h, w)`` from the same pass (a forward hook).

        The activations are ``None`` when the compiled module served the call (its graph runs
        no Python hooks) or the hook did not see every image.
        """
        import torch

        tensors = torch.as_tensor(batch)
        if not with_features or self._compiled is not None:
            return self._logits(tensors).numpy(), None
        from triage_core.models import cam_target_layers

        if self._layers is None:
            self._layers = list(cam_target_layers(self.model, self.spec.arch))
        captured: list[torch.Tensor] = []

        def keep(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            captured.append(output.detach().float().cpu())

        handle = self._layers[0].register_forward_hook(keep)
        try:
            logits = self._logits(tensors).numpy()
        finally:
            handle.remove()
        n = logits.shape[0]
        if len(self._layers) != 1 or sum(c.shape[0] for c in captured) != n:
            return logits, None
        return logits, np.ascontiguousarray(torch.cat(captured).numpy(), dtype=np.float32)

    def ood_features(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Pooled fp32 activations ``(N, K)`` for the out-of-distribution score (one eager
        pass, whatever the mode: :func:`triage_core.ood.pooled_features`)."""
        import torch

        from triage_core import ood

        tensors = torch.as_tensor(batch)
        return ood.pooled_features(self.model, self.spec, tensors, max(1, tensors.shape[0]))

    def explainer(self, features_of: Callable[[np.ndarray], np.ndarray | None]) -> CamExplainer:
        """Grad-CAM over a private fp32 copy of the model, which keeps Grad-CAM's hooks and
        gradients away from the model that serves predictions (``features_of`` is not needed:
        the explainer runs its own pass when the prediction pass kept no activations)."""
        from triage_core.cam import CamExplainer

        return CamExplainer(self.model, self.spec, device=self.device)
