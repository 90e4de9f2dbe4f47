"""Plain, frozen data contracts shared by every part of cxr-triage.

``ModelSpec`` is the metadata written next to a checkpoint's weights (``NAME.json``, DESIGN.md
section 7). ``Finding``, ``ImageResult`` and ``StudyResult`` are what inference hands to the
priority rule, the DICOM output builders and the worklist. Only the standard library is used
here so that every layer can import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from triage_core.errors import SpecMismatchError

#: The findings the service reports, in model output order.
CLASS_NAMES: tuple[str, ...] = ("Atelectasis", "Effusion", "Infiltration")
#: Supported output heads: softmax over classes, or one sigmoid per class.
TASKS: tuple[str, ...] = ("multiclass", "multilabel")
#: Version of the pixel pipeline in ``triage_core.imaging``; bump when ``to_tensor`` changes.
PREPROCESSING_VERSION = 1
#: Version of the ``ModelSpec`` JSON layout.
SPEC_FORMAT_VERSION = 1
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PRIORITY_LEVELS: tuple[str, ...] = ("routine", "urgent", "critical")


def _float_tuple(name: str, value: Any, length: int | None = None) -> tuple[float, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise SpecMismatchError(name, f"expected a list of numbers, got {value!r}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise SpecMismatchError(name, f"expected numbers, got {value!r}") from exc
    if length is not None and len(out) != length:
        raise SpecMismatchError(name, f"expected {length} values, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise SpecMismatchError(name, f"values must be finite, got {value!r}")
    return out


#: Keys of a non-empty ``ModelSpec.ood`` (see ``triage_core.ood``).
OOD_KEYS: tuple[str, ...] = (
    "method",
    "features",
    "components",
    "mean",
    "basis",
    "variances",
    "t2_scale",
    "residual_scale",
    "threshold",
)


def _check_ood(ood: Mapping[str, Any]) -> None:
    """Shape and type checks of the OOD reference (decoding is ``triage_core.ood``'s)."""
    import base64
    import binascii

    missing = [k for k in OOD_KEYS if k not in ood]
    if missing:
        raise SpecMismatchError(f"ood.{missing[0]}", "missing")
    unknown = sorted(set(ood) - set(OOD_KEYS) - {"reference", "scale"})
    if unknown:
        raise SpecMismatchError(f"ood.{unknown[0]}", "unknown field")
    if ood["method"] != "pca_mahalanobis":
        raise SpecMismatchError("ood.method", f"expected 'pca_mahalanobis', got {ood['method']!r}")
    for name in ("features", "components"):
        value = ood[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecMismatchError(f"ood.{name}", f"expected a positive integer, got {value!r}")
    if ood["components"] > ood["features"]:
        raise SpecMismatchError("ood.components", "more components than features")
    sizes = {"mean": ood["features"], "basis": ood["features"] * ood["components"]}
    if "scale" in ood:  # optional: references before it are unstandardised
        sizes["scale"] = ood["features"]
    for name, count in sizes.items():
        try:
            raw = base64.b64decode(str(ood[name]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SpecMismatchError(f"ood.{name}", f"not base64 ({exc})") from exc
        if len(raw) != 2 * count:  # float16
            raise SpecMismatchError(
                f"ood.{name}", f"expected {count} float16 values, got {len(raw)} bytes"
            )
    variances = _float_tuple("ood.variances", ood["variances"], ood["components"])
    if min(variances) <= 0:
        raise SpecMismatchError("ood.variances", "must be positive")
    for name in ("t2_scale", "residual_scale", "threshold"):
        value = _float_tuple(f"ood.{name}", [ood[name]], 1)[0]
        if value <= 0:
            raise SpecMismatchError(f"ood.{name}", f"must be positive, got {value}")


def _check_drift(drift: Mapping[str, Any], class_names: Sequence[str]) -> None:
    """Shape checks of the drift reference: per class a histogram of ``bins`` shares of the
    out-of-fold calibrated probabilities (equal-width bins on [0, 1], summing to 1) and the
    reference positive (flagged) share."""
    bins = drift.get("bins")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise SpecMismatchError("drift.bins", f"expected an integer >= 2, got {bins!r}")
    classes = drift.get("classes")
    if not isinstance(classes, Mapping) or sorted(classes) != sorted(class_names):
        raise SpecMismatchError("drift.classes", f"expected one entry per class {class_names}")
    for name, entry in classes.items():
        if not isinstance(entry, Mapping):
            raise SpecMismatchError(f"drift.classes.{name}", "expected a JSON object")
        hist = _float_tuple(f"drift.classes.{name}.histogram", entry.get("histogram"), bins)
        if min(hist) < 0 or abs(sum(hist) - 1.0) > 1e-3:
            raise SpecMismatchError(
                f"drift.classes.{name}.histogram", "expected non-negative shares summing to 1"
            )
        share = _float_tuple(f"drift.classes.{name}.positive_share", [entry.get("positive_share")])
        if not 0.0 <= share[0] <= 1.0:
            raise SpecMismatchError(f"drift.classes.{name}.positive_share", "must lie in [0, 1]")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to use a set of weights correctly.

    Parameters
    ----------
    arch : str
        Registered architecture name (``resnet18`` or ``efficientnet_b0``).
    class_names : tuple of str
        Output order of the model's logits.
    task : str
        ``multiclass`` (softmax) or ``multilabel`` (sigmoid per class).
    input_size : int
        Side of the square input tensor in pixels.
    mean, std : tuple of 3 floats
        Per-channel normalisation applied after scaling the image to [0, 1].
    preprocessing_version : int
        Version of ``triage_core.imaging.to_tensor`` the weights were trained with.
    temperature : float
        Temperature-scaling factor (logits are divided by it); 1.0 means uncalibrated.
    thresholds : tuple of floats
        Per-class operating threshold on the calibrated probability ("present" at or above).
    priority_weights : tuple of floats
        Per-class weight of the finding in the study priority score (see ``triage_core.priority``).
    name, version : str
        Human-facing model identity, written into logs, SR and worklist rows.
    training : dict
        Training summary (data, split sizes, epochs, seed, command...).
    metrics : dict
        Validation / test metrics recorded at training time.
    ood : dict
        Out-of-distribution reference (``triage_core.ood.fit_reference``): the training images'
        pooled features summarised by a mean and a PCA basis, and the score ``threshold`` above
        which an image is reported as low confidence. Empty: no OOD score.
    drift : dict
        Score-drift reference: per class the histogram of out-of-fold calibrated probabilities
        (``bins`` equal-width bins on [0, 1]) and the positive share at the threshold
        (``training.oof.drift_reference``). Empty: the drift panel has no reference.
    code_version : str
        Version of cxr-triage that produced the checkpoint.
    """

    arch: str
    class_names: tuple[str, ...] = CLASS_NAMES
    task: str = "multilabel"
    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    preprocessing_version: int = PREPROCESSING_VERSION
    temperature: float = 1.0
    thresholds: tuple[float, ...] = (0.5, 0.5, 0.5)
    priority_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    name: str = ""
    version: str = "0"
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    ood: Mapping[str, Any] = field(default_factory=dict)
    drift: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""
    format_version: int = SPEC_FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def display_name(self) -> str:
        return f"{self.name or self.arch} v{self.version}"

    def validate(self) -> None:
        """Raise :class:`SpecMismatchError` naming the first invalid field."""
        if not isinstance(self.arch, str) or not self.arch:
            raise SpecMismatchError("arch", f"expected a non-empty string, got {self.arch!r}")
        if (
            not isinstance(self.class_names, tuple)
            or not self.class_names
            or not all(isinstance(c, str) and c for c in self.class_names)
        ):
            raise SpecMismatchError("class_names", f"expected names, got {self.class_names!r}")
        if len(set(self.class_names)) != len(self.class_names):
            raise SpecMismatchError("class_names", f"duplicate names in {self.class_names!r}")
        if self.task not in TASKS:
            raise SpecMismatchError("task", f"expected one of {TASKS}, got {self.task!r}")
        if (
            not isinstance(self.input_size, int)
            or isinstance(self.input_size, bool)
            or not 32 <= self.input_size <= 2048
        ):
            raise SpecMismatchError(
                "input_size", f"expected an integer in [32, 2048], got {self.input_size!r}"
            )
        for name in ("mean", "std"):
            values = _float_tuple(name, getattr(self, name), 3)
            if name == "std" and min(values) <= 0:
                raise SpecMismatchError("std", f"must be positive, got {values}")
        if self.preprocessing_version != PREPROCESSING_VERSION:
            raise SpecMismatchError(
                "preprocessing_version",
                f"checkpoint uses version {self.preprocessing_version!r}, this code implements "
                f"{PREPROCESSING_VERSION}",
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise SpecMismatchError(
                "temperature", f"expected a positive number, got {self.temperature!r}"
            )
        thresholds = _float_tuple("thresholds", self.thresholds, self.num_classes)
        if not all(0.0 <= t <= 1.0 for t in thresholds):
            raise SpecMismatchError("thresholds", f"must lie in [0, 1], got {thresholds}")
        weights = _float_tuple("priority_weights", self.priority_weights, self.num_classes)
        if min(weights) < 0:
            raise SpecMismatchError("priority_weights", f"must be >= 0, got {weights}")
        if not isinstance(self.name, str):
            raise SpecMismatchError("name", f"expected a string, got {self.name!r}")
        if not isinstance(self.version, str):
            raise SpecMismatchError("version", f"expected a string, got {self.version!r}")
        for name in ("training", "metrics", "ood", "drift"):
            if not isinstance(getattr(self, name), Mapping):
                raise SpecMismatchError(name, "expected a JSON object")
        if self.ood:
            _check_ood(self.ood)
        if self.drift:
            _check_drift(self.drift, self.class_names)
        if self.format_version != SPEC_FORMAT_VERSION:
            raise SpecMismatchError(
                "format_version",
                f"expected {SPEC_FORMAT_VERSION}, got {self.format_version!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out = asdict(self)
        out["training"] = dict(self.training)
        out["metrics"] = dict(self.metrics)
        out["ood"] = dict(self.ood)
        out["drift"] = dict(self.drift)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build and validate a spec from parsed JSON; unknown or missing fields are refused."""
        if not isinstance(data, Mapping):
            raise SpecMismatchError("<root>", "expected a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecMismatchError(unknown[0], "unknown field")
        required = (
            "arch",
            "class_names",
            "task",
            "input_size",
            "mean",
            "std",
            "temperature",
            "thresholds",
            "preprocessing_version",
        )
        for name in required:
            if name not in data:
                raise SpecMismatchError(name, "missing")
        kwargs = dict(data)
        for name in ("class_names",):
            value = kwargs[name]
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise SpecMismatchError(name, f"expected a list, got {value!r}")
            kwargs[name] = tuple(value)
        for name in ("mean", "std", "thresholds", "priority_weights"):
            if name in kwargs:
                kwargs[name] = _float_tuple(name, kwargs[name])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with ``changes`` applied (validated)."""
        data = self.to_dict()
        data.update(changes)
        return ModelSpec.from_dict(data)


@dataclass(frozen=True)
class Finding:
    """One finding at study level (or image level).

    ``probability`` is calibrated; ``present`` is ``probability >= threshold``.
    ``source_uid`` identifies the image that gave the probability (SOP Instance UID or path).
    """

    name: str
    probability: float
    threshold: float
    present: bool
    source_uid: str = ""


@dataclass(frozen=True)
class ImageResult:
    """Outcome for one input image."""

    uid: str
    eligible: bool
    reason: str = ""
    probabilities: Mapping[str, float] = field(default_factory=dict)
    error: str = ""
    #: Out-of-distribution score (``triage_core.ood``); ``None`` when the model has no reference.
    ood_score: float | None = None
    #: The score is above the checkpoint's threshold: the image is unlike the training images.
    low_confidence: bool = False


@dataclass(frozen=True)
class StudyResult:
    """Outcome for one study: findings, priority and provenance."""

    study_uid: str
    status: str  # "done" or "not_eligible"
    reason: str = ""
    findings: tuple[Finding, ...] = ()
    priority_score: float = 0.0
    priority_level: str = "routine"
    images: tuple[ImageResult, ...] = ()
    model_name: str = ""
    model_version: str = ""
    timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def low_confidence(self) -> bool:
        """Some eligible image scored above the out-of-distribution threshold."""
        return any(im.low_confidence for im in self.images if im.eligible and not im.error)

    @property
    def ood_score(self) -> float | None:
        """The highest out-of-distribution score of the eligible images (``None``: unscored)."""
        scores = [
            im.ood_score
            for im in self.images
            if im.eligible and not im.error and im.ood_score is not None
        ]
        return max(scores) if scores else None

    @property
    def top_finding(self) -> Finding | None:
        """The finding with the highest probability, or ``None`` without findings."""
        if not self.findings:
            return None
        return max(self.findings, key=lambda f: f.probability)
