"""Grad-CAM heatmaps at the source image's resolution, and RGB overlays for readers.

Grad-CAM (Selvaraju et al., 2017) weighs the activations of the last convolutional stage
(``models.cam_target_layers``: ResNet-18 ``layer4[-1]``, EfficientNet-B0 ``bn2``) by the
spatially averaged gradient of one class's logit, keeps the positive part and scales it to
[0, 1]. We compute it with ``pytorch_grad_cam`` (imported lazily: ~2.7 s), always inside
``with GradCAM(...) as cam:`` so that its hooks are released after every call, even on error.

The map is computed on the letterboxed model input (``imaging.to_tensor``); :func:`to_source`
crops the padding back off (``imaging.letterbox_geometry``) and resizes the map once, to the source
image's ``H x W`` or to the smaller output size of the overlay (``max_side``), so it lines up
with what the reader sees.

Three ways to the same map:

* :meth:`CamExplainer.square_map`: ``pytorch_grad_cam`` on a new forward and backward pass of the
  whole model (the reference; about 1.5 forward passes of CPU time);
* :meth:`CamExplainer.map_from_features`: from the target layer's activations captured during
  the prediction pass (:meth:`~triage_core.inference.Predictor.predict_with_features`). The
  target layer is the last one before the classifier head (global pooling + linear), so only
  the head is run again, with autograd, to get the gradients: same formula, same scaling as
  ``pytorch_grad_cam`` (tested against it), without a second pass through the backbone. The
  explainer checks once, on a probe input, that its head reproduces the model's logits from the
  target layer's output; where it does not (another architecture), only ``square_map`` is used.

:class:`FeatureCam` (the ONNX Runtime path, numpy only): for our architectures the head is
global average pooling + a linear layer, so the gradient of class ``k``'s logit with respect to
the feature map is ``w_k / (h w)`` everywhere, and Grad-CAM reduces to the class activation map
``relu(sum_c w_kc A_c)`` (Zhou et al., 2016), scaled the same way. The weights come from the
serving graph's metadata (:mod:`triage_core.runtime`); the export checks the result against
``pytorch_grad_cam`` (within 1e-3).

:class:`CamExplainer` works on a private copy of the model in which only the target layer's
parameters require gradients: the backward pass then stops at the target layer (cheap), and
hooks and gradients never touch the model that serves predictions.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def output_shape(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """``(height, width)`` scaled down (aspect ratio kept) so the longer side is <= ``max_side``.

    ``None`` or a ``max_side`` at least as large as the image keeps the image's shape.
    """
    if max_side is None or max(height, width) <= max_side:
        return height, width
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_source(
    square_map: np.ndarray, height: int, width: int, out_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Undo the letterbox: crop a ``S x S`` model-input map and resize it to the image.

    Parameters
    ----------
    square_map : numpy.ndarray
        ``S x S`` map over the model input (``S = spec.input_size``), values in [0, 1].
    height, width : int
        Shape of the source image the model input was made from.
    out_shape : (int, int), optional
        ``(rows, cols)`` of the result when it differs from the source's (a scaled-down overlay,
        see :func:`output_shape`); the crop is resized once, straight to it.

    Returns
    -------
    numpy.ndarray
        float32 ``height x width`` (or ``out_shape``) in [0, 1], rescaled so its maximum over
        the image is 1 (unless it is 0 everywhere).
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
    rows, cols = out_shape if out_shape is not None else (height, width)
    resized = cv2.resize(crop, (cols, rows), interpolation=cv2.INTER_LINEAR)
    out = np.clip(resized, 0.0, 1.0).astype(np.float32, copy=False)
    peak = float(out.max())
    if peak > 0:
        out /= np.float32(peak)
    return out


_JET_RGB: list[np.ndarray] = []


def _jet_rgb() -> np.ndarray:
    """OpenCV's jet colour map as a 256 x 1 RGB lookup table (built once)."""
    import cv2

    if not _JET_RGB:
        ramp = np.arange(256, dtype=np.uint8)[:, None]
        _JET_RGB.append(np.ascontiguousarray(cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[:, :, ::-1]))
    return _JET_RGB[0]


def grad_cam_map(activations: np.ndarray, gradients: np.ndarray, size: int) -> np.ndarray:
    """Grad-CAM of one image from its target-layer activations and their gradients.

    The same steps as ``pytorch_grad_cam.GradCAM`` for one target layer: channel weights are the
    spatial means of the gradients, the weighted sum of the activations keeps its positive part,
    is scaled to [0, 1], resized (bilinear) to the ``size x size`` model input and scaled again.

    Parameters
    ----------
    activations, gradients : numpy.ndarray
        ``C x h x w`` float32.
    size : int
        Side of the model input.

    Returns
    -------
    numpy.ndarray
        float32 ``size x size`` in [0, 1].
    """
    import cv2

    if activations.ndim != 3 or activations.shape != gradients.shape:
        raise ExplanationError(
            f"activations {activations.shape} and gradients {gradients.shape} must both be "
            "C x h x w"
        )
    weights = gradients.mean(axis=(1, 2), dtype=np.float32)
    cam = np.maximum((weights[:, None, None] * activations).sum(axis=0), 0).astype(np.float32)
    cam = cam - cam.min()
    cam = cam / (np.float32(1e-7) + cam.max())
    cam = cv2.resize(cam, (size, size))
    cam = np.maximum(cam, 0)
    cam = cam - cam.min()
    result: np.ndarray = (cam / (np.float32(1e-7) + cam.max())).astype(np.float32)
    return result


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
    heat8 = cv2.convertScaleAbs(heat, alpha=255.0)  # rounds to nearest, like np.rint
    colour = cv2.applyColorMap(heat8, _jet_rgb())  # RGB straight away (no BGR -> RGB pass)
    gray8 = cv2.convertScaleAbs(np.clip(image, 0.0, 1.0), alpha=255.0)
    gray = cv2.cvtColor(gray8, cv2.COLOR_GRAY2RGB)
    weight = heat * np.float32(alpha)
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
        self.features_ok = self._probe_head()

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier head (global pooling + linear) applied to target-layer activations."""
        import torch

        model: Any = self.model
        if hasattr(model, "forward_head"):  # timm models
            out: torch.Tensor = model.forward_head(features)
            return out
        if hasattr(model, "avgpool") and hasattr(model, "fc"):  # torchvision ResNet
            out = model.fc(torch.flatten(model.avgpool(features), 1))
            return out
        raise ExplanationError(f"{self.spec.arch}: no known classifier head")

    def _probe_head(self) -> bool:
        """Whether ``_head(target layer output) == model(x)``, on one random probe input.

        Only then may :meth:`map_from_features` stand in for a full Grad-CAM pass.
        """
        import torch

        if len(self.target_layers) != 1:
            return False
        size = self.spec.input_size
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(1, 3, size, size, generator=generator).to(self.device)
        captured: list[torch.Tensor] = []
        handle = self.target_layers[0].register_forward_hook(
            lambda _m, _i, out: captured.append(out.detach())
        )
        try:
            with torch.no_grad():
                logits = self.model(probe)
                if len(captured) != 1:
                    return False
                again = self._head(captured[0])
        except (ExplanationError, RuntimeError, TypeError, AttributeError) as exc:
            logger.info("Grad-CAM from prediction features unavailable: %s", exc)
            return False
        finally:
            handle.remove()
        ok = tuple(again.shape) == tuple(logits.shape) and bool(
            torch.allclose(again, logits, rtol=1e-4, atol=1e-4)
        )
        if not ok:
            logger.info("Grad-CAM from prediction features unavailable: the head does not match")
        return ok

    def map_from_features(self, features: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM of class ``class_index`` from the target layer's activations of one image.

        Parameters
        ----------
        features : numpy.ndarray
            ``C x h x w`` float32 activations of the target layer, captured by
            :meth:`~triage_core.inference.Predictor.predict_with_features`.
        class_index : int
            Index into ``spec.class_names``.

        Returns
        -------
        numpy.ndarray
            float32 ``S x S`` in [0, 1], as :meth:`square_map` gives.

        Raises
        ------
        ExplanationError
            The model's head cannot be separated (``features_ok`` is false), bad class index or
            input shape.
        """
        import torch

        if not self.features_ok:
            raise ExplanationError(f"{self.spec.arch}: Grad-CAM from features is unavailable")
        self._check_class(class_index)
        if not isinstance(features, np.ndarray) or features.ndim != 3:
            raise ExplanationError(
                f"expected C x h x w activations, got {getattr(features, 'shape', features)!r}"
            )
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            activations = torch.tensor(features, dtype=torch.float32, device=self.device)[None]
            activations.requires_grad_(True)
            try:
                logits = self._head(activations)
                (gradients,) = torch.autograd.grad(logits[0, class_index], activations)
            except RuntimeError as exc:
                raise ExplanationError(f"Grad-CAM from features failed: {exc}") from exc
        result = grad_cam_map(
            activations[0].detach().cpu().numpy(),
            gradients[0].cpu().numpy(),
            self.spec.input_size,
        )
        if not np.isfinite(result).all():
            raise ExplanationError("Grad-CAM from features returned non-finite values")
        return result

    def _check_class(self, class_index: int) -> None:
        if not isinstance(class_index, int) or not 0 <= class_index < self.spec.num_classes:
            raise ExplanationError(
                f"class index {class_index!r} outside [0, {self.spec.num_classes})"
            )

    def square_map(self, tensor: torch.Tensor | np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM of class ``class_index`` over the model input.

        Parameters
        ----------
        tensor : torch.Tensor or numpy.ndarray
            ``(3, S, S)`` or ``(1, 3, S, S)`` from ``imaging.to_tensor`` / ``to_array``.
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

        self._check_class(class_index)
        size = self.spec.input_size
        tensor = torch.as_tensor(tensor)
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
        tensor: torch.Tensor | np.ndarray | None = None,
        *,
        features: np.ndarray | None = None,
        max_side: int | None = None,
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
        features : numpy.ndarray, optional
            The image's target-layer activations from the prediction pass: the map is then
            computed from them (:meth:`map_from_features`) instead of a new Grad-CAM pass.
        max_side : int, optional
            Longest side of the heatmap and overlay (aspect ratio kept; ``None``: the image's
            size). The gray image is scaled down once (area averaging) and the map is resized
            once, straight to that size.

        Returns
        -------
        CamResult
            Heatmap ``h x w`` and RGB overlay ``h x w x 3`` at the source resolution, or scaled
            down to ``max_side``.
        """
        from triage_core.imaging import to_tensor

        if image.ndim != 2:
            raise ExplanationError(f"expected a 2-D gray image, got shape {image.shape}")
        if features is not None and self.features_ok:
            square = self.map_from_features(features, class_index)
        else:
            if tensor is None:
                tensor = to_tensor(image, self.spec)
            square = self.square_map(tensor, class_index)
        return cam_result(self.spec, image, square, class_index, alpha, max_side)


def cam_result(
    spec: ModelSpec,
    image: np.ndarray,
    square: np.ndarray,
    class_index: int,
    alpha: float,
    max_side: int | None,
) -> CamResult:
    """Heatmap and overlay at the image's resolution (or ``max_side``) from a square map."""
    import cv2

    height, width = image.shape
    shape = output_shape(height, width, max_side)
    heatmap = to_source(square, height, width, shape)
    if shape != (height, width):
        gray = np.asarray(image, dtype=np.float32)
        image = cv2.resize(gray, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return CamResult(
        class_index=class_index,
        class_name=spec.class_names[class_index],
        heatmap=heatmap,
        overlay=overlay_heatmap(image, heatmap, alpha),
    )


def class_activation_map(features: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Grad-CAM of a global-average-pooling + linear head, in closed form (numpy only).

    The gradient of ``logit_k = w_k . mean(A) + b_k`` with respect to ``A`` is ``w_k / (h w)``
    at every position, so :func:`grad_cam_map` is applied to those gradients: the same
    weighting, positive part and scaling as ``pytorch_grad_cam``.

    Parameters
    ----------
    features : numpy.ndarray
        ``K x h x w`` feature map of one image.
    weights : numpy.ndarray
        ``(K,)`` classifier weights of the explained class.
    size : int
        Side of the model input.
    """
    if features.ndim != 3 or weights.shape != (features.shape[0],):
        raise ExplanationError(
            f"features {features.shape} and class weights {weights.shape} do not fit"
        )
    per_position = np.float32(1.0 / (features.shape[1] * features.shape[2]))
    gradients = np.broadcast_to(
        (weights.astype(np.float32) * per_position)[:, None, None], features.shape
    )
    return grad_cam_map(np.asarray(features, dtype=np.float32), gradients, size)


class FeatureCam:
    """Class activation maps from the serving graph's feature map (ONNX Runtime, no torch).

    Parameters
    ----------
    spec : ModelSpec
        Class names and input size.
    head_weight : numpy.ndarray
        ``(C, K)`` classifier weights (:class:`triage_core.runtime.OnnxModel`).
    features_of : callable
        ``(N, 3, S, S)`` inputs -> ``(N, K, h, w)`` features (one graph run), for images whose
        prediction-pass features were not kept.
    """

    features_ok = True

    def __init__(
        self,
        spec: ModelSpec,
        head_weight: np.ndarray,
        features_of: Any,
    ) -> None:
        if head_weight.ndim != 2 or head_weight.shape[0] != spec.num_classes:
            raise ExplanationError(f"head weights of shape {head_weight.shape} do not fit {spec}")
        self.spec = spec
        self.head_weight = np.asarray(head_weight, dtype=np.float32)
        self._features_of = features_of

    def _check_class(self, class_index: int) -> None:
        if not isinstance(class_index, int) or not 0 <= class_index < self.spec.num_classes:
            raise ExplanationError(
                f"class index {class_index!r} outside [0, {self.spec.num_classes})"
            )

    def map_from_features(self, features: np.ndarray, class_index: int) -> np.ndarray:
        """The ``S x S`` map of class ``class_index`` from one image's ``K x h x w`` features."""
        self._check_class(class_index)
        if not isinstance(features, np.ndarray) or features.ndim != 3:
            raise ExplanationError(
                f"expected K x h x w features, got {getattr(features, 'shape', features)!r}"
            )
        result = class_activation_map(features, self.head_weight[class_index], self.spec.input_size)
        if not np.isfinite(result).all():
            raise ExplanationError("the class activation map has non-finite values")
        return result

    def square_map(self, tensor: np.ndarray, class_index: int) -> np.ndarray:
        """The map of class ``class_index`` for a ``(3, S, S)`` input (one graph run)."""
        size = self.spec.input_size
        batch = np.asarray(tensor, dtype=np.float32)
        batch = batch[None] if batch.ndim == 3 else batch
        if batch.shape != (1, 3, size, size):
            raise ExplanationError(f"expected a (3, {size}, {size}) input, got {batch.shape}")
        self._check_class(class_index)
        features = self._features_of(batch)
        return self.map_from_features(np.asarray(features)[0], class_index)

    def explain(
        self,
        image: np.ndarray,
        class_index: int,
        alpha: float = DEFAULT_ALPHA,
        tensor: np.ndarray | None = None,
        *,
        features: np.ndarray | None = None,
        max_side: int | None = None,
    ) -> CamResult:
        """As :meth:`CamExplainer.explain`; ``features`` from the prediction pass avoid a run."""
        from triage_core.imaging import to_array

        if image.ndim != 2:
            raise ExplanationError(f"expected a 2-D gray image, got shape {image.shape}")
        if features is not None:
            square = self.map_from_features(features, class_index)
        else:
            square = self.square_map(
                tensor if tensor is not None else to_array(image, self.spec), class_index
            )
        return cam_result(self.spec, image, square, class_index, alpha, max_side)
