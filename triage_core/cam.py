"""Grad-CAM heatmaps at the source image's resolution, and RGB overlays for readers.

Grad-CAM (Selvaraju et al., 2017) weighs the activations of the last convolutional stage
(``models.cam_target_layers``: ResNet-18 ``layer4[-1]``, EfficientNet-B0 ``bn2``) by the
spatially averaged gradient of one class's logit, keeps the positive part and scales it to
[0, 1]. We compute it with ``pytorch_grad_cam`` (imported lazily: ~2.7 s), always inside
``with GradCAM(...) as cam:`` so that its hooks are released after every call, even on error.

The map is computed on the letterboxed model input (``imaging.to_tensor``); :func:`to_source`
crops the padding back off (``imaging.letterbox_geometry``) and resizes the map to the source
image's ``H x W``, so it lines up pixel for pixel with what the reader sees.

:class:`CamExplainer` works on a private copy of the model in which only the target layer's
parameters require gradients: the backward pass then stops at the target layer (cheap), and
hooks and gradients never touch the model that serves predictions.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from triage_core.errors import TriageError
from triage_core.spec import ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Default opacity of the heatmap where it is strongest (it fades to 0 where the map is 0).
DEFAULT_ALPHA = 0.5


class ExplanationError(TriageError):
    """A Grad-CAM map could not be computed for the given input and class."""


@dataclass(frozen=True)
class CamResult:
    """A Grad-CAM explanation of one class on one image.

    Attributes
    ----------
    class_index : int
        Index into ``spec.class_names``.
    class_name : str
        The explained finding.
    heatmap : numpy.ndarray
        float32 ``H x W`` in [0, 1], at the source image's resolution.
    overlay : numpy.ndarray
        uint8 ``H x W x 3`` RGB: the image in gray with the heatmap blended in (jet colours).
    """

    class_index: int
    class_name: str
    heatmap: np.ndarray
    overlay: np.ndarray


def to_source(square_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo the letterbox: crop a ``S x S`` model-input map and resize it to ``height x width``.

    Parameters
    ----------
    square_map : numpy.ndarray
        ``S x S`` map over the model input (``S = spec.input_size``), values in [0, 1].
    height, width : int
        Shape of the source image the model input was made from.

    Returns
    -------
    numpy.ndarray
        float32 ``height x width`` in [0, 1], rescaled so its maximum over the image is 1
        (unless it is 0 everywhere).
    """
    import cv2

    from triage_core.imaging import letterbox_geometry

    if square_map.ndim != 2 or square_map.shape[0] != square_map.shape[1]:
        raise ValueError(f"expected a square 2-D map, got shape {square_map.shape}")
    box = letterbox_geometry(height, width, square_map.shape[0])
    crop = np.ascontiguousarray(
        square_map[box.top : box.top + box.new_h, box.left : box.left + box.new_w],
        dtype=np.float32,
    )
    resized = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    out = np.clip(resized, 0.0, 1.0).astype(np.float32, copy=False)
    peak = float(out.max())
    if peak > 0:
        out /= np.float32(peak)
    return out


def overlay_heatmap(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colours) over a gray [0, 1] image.

    The heatmap's opacity is ``alpha * heatmap``: cold regions show the plain image.

    Returns
    -------
    numpy.ndarray
        uint8 ``H x W x 3`` RGB.
    """
    import cv2

    if image.ndim != 2 or image.shape != heatmap.shape:
        raise ValueError(
            f"image {image.shape} and heatmap {heatmap.shape} must be 2-D and of equal shape"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    heat = np.clip(heatmap, 0.0, 1.0).astype(np.float32, copy=False)
    heat8 = np.rint(heat * np.float32(255.0)).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(heat8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    gray8 = np.rint(np.clip(image, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    gray = cv2.cvtColor(gray8, cv2.COLOR_GRAY2RGB)
    weight = (np.float32(alpha) * heat).astype(np.float32, copy=False)
    # per-pixel weighted sum, in C++: gray * (1 - w) + colour * w
    blended: np.ndarray = cv2.blendLinear(gray, colour, np.float32(1.0) - weight, weight)
    return blended


class CamExplainer:
    """Grad-CAM for one model; thread-safe (calls are serialised).

    Parameters
    ----------
    model : torch.nn.Module
        The classifier; it is deep-copied (fp32, NCHW, eval) and never modified.
    spec : ModelSpec
        Its spec (architecture for the target layer, class names, input size).
    device : str or torch.device
        Where the copy runs.
    """

    def __init__(
        self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu"
    ) -> None:
        import torch

        from triage_core.models import cam_target_layers

        self.spec = spec
        self.device = torch.device(device)
        core = getattr(model, "module", model)
        own = copy.deepcopy(core).to(self.device, torch.float32)
        own = own.to(memory_format=torch.contiguous_format).eval()
        self.model: torch.nn.Module = own
        self.target_layers = cam_target_layers(own, spec.arch)
        layer_params = [p for layer in self.target_layers for p in layer.parameters()]
        # Only the target layer needs gradients: the backward pass stops there. A target
        # without parameters would get no gradient that way, so then everything keeps them.
        if layer_params:
            for param in own.parameters():
                param.requires_grad_(False)
            for param in layer_params:
                param.requires_grad_(True)
        self._lock = threading.Lock()

    def square_map(self, tensor: torch.Tensor, class_index: int) -> np.ndarray:
        """Grad-CAM of class ``class_index`` over the model input.

        Parameters
        ----------
        tensor : torch.Tensor
            ``(3, S, S)`` or ``(1, 3, S, S)`` from ``imaging.to_tensor``.
        class_index : int
            Index into ``spec.class_names``.

        Returns
        -------
        numpy.ndarray
            float32 ``S x S`` in [0, 1].

        Raises
        ------
        ExplanationError
            Bad class index or input shape, or Grad-CAM failed.
        """
        import torch
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if not isinstance(class_index, int) or not 0 <= class_index < self.spec.num_classes:
            raise ExplanationError(
                f"class index {class_index!r} outside [0, {self.spec.num_classes})"
            )
        size = self.spec.input_size
        batch = tensor[None] if tensor.ndim == 3 else tensor
        if tuple(batch.shape) != (1, 3, size, size):
            raise ExplanationError(
                f"expected a (3, {size}, {size}) tensor, got {tuple(tensor.shape)}"
            )
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            # a normal (not inference-mode) copy, so autograd may record from it
            batch = batch.to(self.device, torch.float32).clone()
            try:
                with GradCAM(model=self.model, target_layers=self.target_layers) as cam:
                    try:
                        maps = cam(
                            input_tensor=batch, targets=[ClassifierOutputTarget(class_index)]
                        )
                    except (IndexError, RuntimeError, ValueError) as exc:
                        # not IndexError past this point: BaseCAM.__exit__ would swallow it
                        raise ExplanationError(f"Grad-CAM failed: {exc}") from exc
            finally:
                for param in self.model.parameters():
                    param.grad = None
        result = np.asarray(maps[0], dtype=np.float32)
        if result.shape != (size, size) or not np.isfinite(result).all():
            raise ExplanationError(f"Grad-CAM returned an invalid map of shape {result.shape}")
        return np.clip(result, 0.0, 1.0)

    def explain(
        self,
        image: np.ndarray,
        class_index: int,
        alpha: float = DEFAULT_ALPHA,
        tensor: torch.Tensor | None = None,
    ) -> CamResult:
        """Grad-CAM of one class on a display-ready image, at the image's resolution.

        Parameters
        ----------
        image : numpy.ndarray
            float ``H x W`` in [0, 1] (``imaging.load_image``).
        class_index : int
            Index into ``spec.class_names``.
        alpha : float
            Maximum opacity of the heatmap in the overlay.
        tensor : torch.Tensor, optional
            ``imaging.to_tensor(image, spec)`` when the caller already has it.

        Returns
        -------
        CamResult
            Heatmap ``H x W`` and RGB overlay ``H x W x 3`` at the source resolution.
        """
        from triage_core.imaging import to_tensor

        if image.ndim != 2:
            raise ExplanationError(f"expected a 2-D gray image, got shape {image.shape}")
        if tensor is None:
            tensor = to_tensor(image, self.spec)
        square = self.square_map(tensor, class_index)
        heatmap = to_source(square, image.shape[0], image.shape[1])
        return CamResult(
            class_index=class_index,
            class_name=self.spec.class_names[class_index],
            heatmap=heatmap,
            overlay=overlay_heatmap(image, heatmap, alpha),
        )
