"""Out-of-distribution score: how unlike the training images an input looks to the model.

A classifier gives confident-looking probabilities for anything, a hip film or a photograph
included. The score here measures the distance of the image's pooled features (the global
average of the Grad-CAM target layer, i.e. what the classifier head sees) from the training
images' features:

* each feature is standardised by its training mean and standard deviation (``scale``), so that
  the few channels the fine-tuned head leans on do not drown the rest;
* the standardised training features are summarised by the ``k`` leading principal components
  (a full covariance of 1280 features cannot be estimated from a few thousand images);
* two distances are measured: the Mahalanobis distance inside that subspace (Hotelling's T^2,
  per component: ``sqrt(T^2 / k)``) and the distance outside it (the residual norm,
  ``sqrt(Q)``); each is divided by its median over the threshold images, and the
  score is the larger of the two, so a typical chest film scores about 1 and an image that is
  atypical in either way scores high:
  ``score = max(sqrt(T^2 / k) / t2_scale, sqrt(Q) / residual_scale)``;
* the threshold is a high quantile of the held-out images' scores (the training images' where
  none is held out), so about ``1 - quantile`` of ordinary chest films are flagged.

Measured on fold 0 of the 5-fold CV of the plain Lite0 recipe on the 2,134 shared NIH images
(seed 1; reference fitted on the fold's 1,707 training images, threshold their 0.99 quantile;
``score / threshold`` below): without standardisation and ``k = 16`` (the rule of the first
reference, fitted on 117-643 images) the shared hip film scored 0.81-0.83 and the photograph 1.03
-- the fine-tuned features of a model trained on the enlarged, disease-heavy set place the hip
inside the chest films' tail. Standardised with ``k = 128``: hip 1.11-1.22, dental film 1.11,
photograph 1.21, the shared chest DICOMs at most 0.80, 0.7 % of the fold's 427 held-out NIH
images flagged (their 0.99 quantile at 0.98). More components overfit the residual: ``k = 256``
(6.7 training images per component) flagged 18 % of the held-out images. Hence the default
``k = min(128, N // 12)``.

(Lee et al. 2018 use class-conditional Mahalanobis distances with a shared covariance; with three
overlapping labels a single Gaussian in a PCA subspace is what the data supports. PCA T^2 + Q is
the classical pair from multivariate process monitoring.)

The reference lives in ``ModelSpec.ood`` (float16 arrays, base64), written at export time by
:func:`fit_reference`; :func:`scores` applies it. Above ``threshold`` an image is reported as low
confidence (SR, worklist, API, ``triage predict``). A reference without ``scale`` (checkpoints
before it) is applied unstandardised.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.errors import SpecMismatchError
from triage_core.spec import ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

METHOD = "pca_mahalanobis"
#: Most principal components kept by default, and the fewest training images per component
#: (see the module docstring: 128 components of 1,707 images held; 256 overfit the residual).
DEFAULT_COMPONENTS = 128
IMAGES_PER_COMPONENT = 12
#: Default quantile of the held-out scores used as the threshold.
DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class Reference:
    """Decoded ``ModelSpec.ood``."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    t2_scale: float
    residual_scale: float
    threshold: float
    scale: np.ndarray | None = None  # (D,) training standard deviations; None: unstandardised

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Reference | None:
        """The reference of ``spec``, or ``None`` when the checkpoint has none."""
        ood = spec.ood
        if not ood:
            return None
        features, k = int(ood["features"]), int(ood["components"])
        return cls(
            mean=_decode(ood["mean"], (features,)),
            basis=_decode(ood["basis"], (k, features)),
            variances=np.asarray(ood["variances"], dtype=np.float64),
            t2_scale=float(ood["t2_scale"]),
            residual_scale=float(ood["residual_scale"]),
            threshold=float(ood["threshold"]),
            scale=_positive(_decode(ood["scale"], (features,))) if "scale" in ood else None,
        )

    def scores(self, pooled: np.ndarray) -> np.ndarray:
        """Scores ``(N,)`` for pooled features ``(N, D)``."""
        t2, residual = self.distances(pooled)
        out: np.ndarray = np.maximum(t2 / self.t2_scale, residual / self.residual_scale)
        return out

    def distances(self, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sqrt(T^2 / k), sqrt(Q))`` for pooled features ``(N, D)``, before scaling."""
        x = np.asarray(pooled, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"expected pooled features of shape (N, {self.mean.shape[0]}), got {x.shape}"
            )
        centred = x - self.mean
        if self.scale is not None:
            centred = centred / self.scale
        coords = centred @ self.basis.T
        t2 = (coords**2 / self.variances).sum(axis=1) / self.basis.shape[0]
        residual = ((centred - coords @ self.basis) ** 2).sum(axis=1)
        return np.sqrt(t2), np.sqrt(residual)


def _encode(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f2").tobytes()).decode("ascii")


def _positive(values: np.ndarray) -> np.ndarray:
    if not (np.isfinite(values) & (values > 0)).all():
        raise SpecMismatchError("ood.scale", "standard deviations must be positive and finite")
    return values


def _stored(values: np.ndarray) -> np.ndarray:
    """``values`` as the spec will hold them (float16), back in float64."""
    return np.asarray(values, dtype=np.float16).astype(np.float64)


def _decode(text: str, shape: tuple[int, ...]) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    values = np.frombuffer(raw, dtype="<f2").astype(np.float64)
    if values.size != int(np.prod(shape)):
        raise SpecMismatchError("ood", f"expected {shape} values, got {values.size}")
    return values.reshape(shape)


def pooled_features(
    model: torch.nn.Module, spec: ModelSpec, tensors: torch.Tensor, batch_size: int = 32
) -> np.ndarray:
    """Global-average-pooled activations of the Grad-CAM target layer, ``(N, D)`` float32.

    ``tensors`` are ``(N, 3, S, S)`` from ``imaging.to_tensor`` (fp16 caches are accepted).
    The model is run in eval mode, fp32, without gradients.
    """
    import torch

    from triage_core.models import cam_target_layers

    layer = cam_target_layers(model, spec.arch)[0]
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        captured.append(output.detach().float().mean(dim=(2, 3)).cpu())

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handle = layer.register_forward_hook(keep)
    try:
        with torch.inference_mode():
            for start in range(0, tensors.shape[0], batch_size):
                batch = tensors[start : start + batch_size].to(device, torch.float32)
                model(batch)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        return np.zeros((0, 0), dtype=np.float32)
    return np.ascontiguousarray(torch.cat(captured).numpy(), dtype=np.float32)


def fit_reference(
    model: torch.nn.Module,
    spec: ModelSpec,
    train: torch.Tensor,
    held_out: torch.Tensor | None = None,
    *,
    components: int | None = None,
    quantile: float = DEFAULT_QUANTILE,
) -> dict[str, Any]:
    """The ``ModelSpec.ood`` entry for ``model``: ``spec.replace(ood=fit_reference(...))``.

    Parameters
    ----------
    model, spec : the trained model (any registered architecture) and its spec.
    train : torch.Tensor
        ``(N, 3, S, S)`` training-split tensors (``imaging.to_tensor``, no augmentation).
    held_out : torch.Tensor, optional
        Validation-split tensors; the threshold is their ``quantile`` score. Without them the
        training scores are used (optimistic: the reference was fitted on them).
    components : int, optional
        Principal components kept (at most ``N - 1``); default
        ``min(DEFAULT_COMPONENTS, N // IMAGES_PER_COMPONENT)``, at least 1.
    quantile : float
        In (0, 1): the share of ordinary images expected below the threshold.

    Returns
    -------
    dict
        JSON-serialisable; ``reference`` records how it was made.

    Raises
    ------
    ValueError
        Too few images, bad ``components`` or ``quantile``.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile!r}")
    n = int(train.shape[0])
    if n < 3:
        raise ValueError(f"an OOD reference needs at least 3 training images, got {n}")
    if components is None:
        components = max(1, min(DEFAULT_COMPONENTS, n // IMAGES_PER_COMPONENT))
    if not isinstance(components, int) or not 1 <= components < n:
        raise ValueError(f"components must be an integer in [1, {n - 1}], got {components!r}")
    feats = pooled_features(model, spec, train).astype(np.float64)
    mean = _stored(feats.mean(axis=0))
    spread = feats.std(axis=0)
    # a (nearly) constant channel gets the floor, not a division by ~0 (fp16 would lose it)
    scale = _stored(np.maximum(spread, max(1e-2 * float(np.median(spread)), 1e-4)))
    standardised = (feats - mean) / scale
    _, singular, vt = np.linalg.svd(standardised, full_matrices=False)  # centred by ``mean``
    k = min(components, vt.shape[0])
    basis = vt[:k]
    variances = np.maximum(singular[:k] ** 2 / (n - 1), 1e-12)
    # the stored (float16) arrays are the ones used from now on: fit the scales with them
    ref = Reference(
        mean=mean,
        basis=_stored(basis),
        variances=variances,
        t2_scale=1.0,
        residual_scale=1.0,
        threshold=1.0,
        scale=scale,
    )
    if held_out is not None and held_out.shape[0] > 0:
        t2, residual = ref.distances(pooled_features(model, spec, held_out))
        source = "held_out"
    else:
        t2, residual = ref.distances(feats)
        source = "train"
    t2_scale = float(max(np.median(t2), 1e-12))
    residual_scale = float(max(np.median(residual), 1e-12))
    calib = np.maximum(t2 / t2_scale, residual / residual_scale)
    threshold = float(np.quantile(calib, quantile))
    logger.info(
        "OOD reference: %d images, %d features, %d components, threshold %.3f (%s q%.3f)",
        n,
        feats.shape[1],
        k,
        threshold,
        source,
        quantile,
    )
    return {
        "method": METHOD,
        "features": int(feats.shape[1]),
        "components": int(k),
        "mean": _encode(mean),
        "scale": _encode(scale),
        "basis": _encode(basis),
        "variances": [float(v) for v in variances],
        "t2_scale": t2_scale,
        "residual_scale": residual_scale,
        "threshold": threshold,
        "reference": {
            "train_images": n,
            "threshold_from": source,
            "threshold_images": int(calib.shape[0]),
            "quantile": quantile,
        },
    }


def scores_from_features(spec: ModelSpec, features: np.ndarray) -> np.ndarray | None:
    """Scores for ``(N, K, h, w)`` activations or ``(N, K)`` pooled features; ``None`` without a
    reference in ``spec``."""
    ref = _reference(spec)
    if ref is None:
        return None
    x = np.asarray(features, dtype=np.float32)
    pooled = x.mean(axis=(2, 3)) if x.ndim == 4 else x
    return ref.scores(pooled)


_CACHE: dict[int, tuple[ModelSpec, Reference | None]] = {}


def _reference(spec: ModelSpec) -> Reference | None:
    """Decoded once per spec object (specs are frozen)."""
    hit = _CACHE.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    ref = Reference.from_spec(spec)
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[id(spec)] = (spec, ref)
    return ref


def threshold(spec: ModelSpec) -> float | None:
    """The checkpoint's OOD threshold, or ``None`` without a reference."""
    ood: Mapping[str, Any] = spec.ood
    return float(ood["threshold"]) if ood else None
