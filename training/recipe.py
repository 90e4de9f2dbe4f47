"""What one model fit is made of: the :class:`Recipe`, its extra image :class:`Source` s and the
errors of training.

A recipe is frozen and checked when it is built (``__post_init__``), so a bad flag fails before
any image is decoded; every fold of a cross-validation and the final fit use the same recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage_core.errors import TriageError

if TYPE_CHECKING:
    from training.data import Augment
    from triage_core.spec import ModelSpec

#: How the classifier starts: the factory's random head, or a linear probe (LP-FT).
HEAD_INITS: tuple[str, ...] = ("random", "probe")
#: Input normalisation: the initial weights' own mean/std, or ImageNet's.
NORMALISATIONS: tuple[str, ...] = ("default", "imagenet")


class TrainingError(TriageError):
    """Training cannot start or continue (bad configuration, unusable resume state)."""


def default_pretrained(arch: str) -> str:
    """The initial weights of ``arch`` when none are named: ImageNet where this machine has
    them (EfficientNet-Lite0/1/2, and EfficientNet-B0 from the Lite0 tensors), else random."""
    return "none" if arch == "resnet18" else "imagenet"


@dataclass(frozen=True)
class Recipe:
    """How one model is fitted; identical for every fold and for the shipped model.

    ``task`` is ``multilabel`` (every image, one sigmoid per finding, BCE with ``pos_weight``)
    or ``multiclass`` (the seed study's protocol: images with exactly one of the findings,
    softmax, class-weighted cross-entropy). ``crop`` is the random resized crop's side range as
    a fraction of the input (``None``: the affine + intensity augmentation of
    :class:`training.data.Augment`); ``ema`` the EMA decay (0: no EMA); ``warmup`` the one-cycle
    schedule's warm-up fraction of the steps; ``head_init`` ``"probe"`` starts the classifier as
    a linear probe on the pretrained features (with ``epochs = 0`` the model *is* the probe);
    ``normalisation`` ``"imagenet"`` feeds ImageNet mean/std instead of the initial weights'
    own (``pretrained`` ``"default"`` resolves to :func:`default_pretrained`); ``freeze_bn``
    keeps the BatchNorm statistics of the initial weights; ``probe_c`` is the
    probe's inverse L2 strength; ``init_from`` starts from the weights of an earlier checkpoint
    (``NAME``, same architecture and task) instead of ``pretrained``; ``degrade64`` the share of
    the main training images shown at 64 px and back (:func:`training.data.degrade_resolution`;
    a seeded, fixed set, training rows only: held-out images stay as they are), so that a 64 px
    source (``cxr14/lowres64``) cannot be told apart by its sharpness.

    Raises
    ------
    TrainingError
        At construction, naming the first bad field and its value.
    """

    arch: str = "efficientnet_lite0"
    image_size: int = 224
    epochs: int = 8
    batch_size: int = 16
    lr: float = 3e-4
    warmup: float = 0.3
    weight_decay: float = 1e-4
    crop: tuple[float, float] | None = (0.875, 1.0)
    hflip: bool = False
    pos_weight: bool = True
    ema: float = 0.998
    pretrained: str = "default"
    seed: int = 0
    head_init: str = "random"
    normalisation: str = "default"
    freeze_bn: bool = False
    probe_c: float = 0.1
    task: str = "multilabel"
    init_from: str | None = None
    degrade64: float = 0.0

    def __post_init__(self) -> None:
        from triage_core.models import ARCHITECTURES
        from triage_core.spec import TASKS

        if self.pretrained == "default":  # frozen: the resolved value is set once, here
            object.__setattr__(self, "pretrained", default_pretrained(self.arch))
        if self.arch not in ARCHITECTURES:
            raise TrainingError(f"--arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.task not in TASKS:
            raise TrainingError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.head_init not in HEAD_INITS:
            raise TrainingError(f"--head-init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.epochs < (0 if self.head_init == "probe" else 1):
            raise TrainingError(
                f"--epochs must be >= 1 (0 only with a probe head), got {self.epochs}"
            )
        if self.batch_size < 1:
            raise TrainingError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.normalisation not in NORMALISATIONS:
            raise TrainingError(
                f"--normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}"
            )
        if not 32 <= self.image_size <= 2048:
            raise TrainingError(f"--image-size must be in [32, 2048], got {self.image_size}")
        if not self.lr > 0:
            raise TrainingError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.warmup < 1:
            raise TrainingError(f"--warmup must be in (0, 1), got {self.warmup}")
        if not 0 <= self.ema < 1:
            raise TrainingError(f"--ema must be in [0, 1), got {self.ema}")
        if self.crop is not None and not 0.3 <= self.crop[0] <= self.crop[1] <= 1.0:
            raise TrainingError(f"--crop must satisfy 0.3 <= low <= high <= 1, got {self.crop}")
        if not self.probe_c > 0:
            raise TrainingError(f"--probe-c must be positive, got {self.probe_c}")
        if not 0.0 <= self.degrade64 < 1.0:
            raise TrainingError(f"--degrade64 must be in [0, 1), got {self.degrade64}")
        if self.init_from is not None and self.head_init == "probe":
            raise TrainingError("--init-from keeps its trained head: not with --head-init probe")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["crop"] = list(self.crop) if self.crop else None
        if not self.degrade64:  # absent when unused: the recipes (and states) of older runs
            del out["degrade64"]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        """The recipe of a ``cv.json`` (runs older than ``task``/``init_from`` get the
        defaults: multilabel, no init checkpoint)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainingError(f"unknown recipe fields {unknown}")
        values = dict(raw)
        if values.get("crop") is not None:
            values["crop"] = tuple(values["crop"])
        return cls(**values)

    def augment(self) -> Augment:
        from training.data import Augment

        if self.crop is None:
            return Augment(hflip=self.hflip)
        return Augment.crop_only(self.crop, hflip=self.hflip)

    def initial_weights(self) -> str | Path | None:
        """``"imagenet"``, a weights file, or ``None`` (random initialisation)."""
        from triage_core.pretrained import IMAGENET

        if self.pretrained.lower() == "none":
            return None
        return IMAGENET if self.pretrained == IMAGENET else Path(self.pretrained)

    def spec(self) -> ModelSpec:
        """The spec of a fresh model of this recipe (task, input size, normalisation)."""
        from triage_core.models import default_spec
        from triage_core.spec import IMAGENET_MEAN, IMAGENET_STD

        spec = default_spec(self.arch, self.task, self.initial_weights()).replace(
            input_size=self.image_size
        )
        if self.normalisation == "imagenet":
            spec = spec.replace(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        if self.init_from is not None:  # the earlier checkpoint's weights expect its inputs
            from triage_core.models import read_spec

            start = read_spec(self.init_from)
            spec = spec.replace(mean=list(start.mean), std=list(start.std))
        return spec


@dataclass(frozen=True)
class Source:
    """A training-only image/label source beside the main data (NIH ``Data_Entry_2017``
    columns): e.g. the 64 px NIH images, or a site's reader-confirmed export
    (``triage feedback export``). ``weight`` is its sampling weight per image relative to the
    main data's 1."""

    images: Path
    labels: Path
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise TrainingError(f"--source weight must be positive, got {self.weight}")

    @classmethod
    def parse(cls, text: str) -> Source:
        """``IMAGES,LABELS[,WEIGHT]`` (the ``--source`` flag)."""
        parts = text.split(",")
        if len(parts) not in (2, 3):
            raise TrainingError(f"--source takes IMAGES,LABELS[,WEIGHT], got {text!r}")
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError as exc:
            raise TrainingError(f"--source weight must be a number, got {parts[2]!r}") from exc
        return cls(Path(parts[0]), Path(parts[1]), weight)


__all__ = ["HEAD_INITS", "Recipe", "Source", "TrainingError", "default_pretrained"]
