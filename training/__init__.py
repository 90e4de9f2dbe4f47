"""cxr-triage training: one flow from labelled images to a shipped checkpoint.

``triage train --cv K`` cross-validates a :class:`Recipe` patient-wise (:mod:`training.cv`;
the run's files are laid out by :class:`CVRun`, its statistics are in :mod:`training.oof`);
``triage train --final-from CVDIR`` fits the recipe on every image and calibrates it on the
out-of-fold predictions (:func:`train_final`). Both fit with the one loop,
:func:`training.fit.fit`. ``triage evaluate`` (:func:`evaluate_checkpoint`) scores a checkpoint
on a labelled set; ``triage compare`` tabulates CV runs made on the same folds.

Importing the package does not import torch (the modules import it where they use it).
"""

import logging

from training.cv import CVConfig, run_cv
from training.evaluate import evaluate_checkpoint
from training.final import train_final
from training.fit import FitResult
from training.recipe import Recipe, Source, TrainingError
from training.runs import CVRun

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CVConfig",
    "CVRun",
    "FitResult",
    "Recipe",
    "Source",
    "TrainingError",
    "evaluate_checkpoint",
    "run_cv",
    "train_final",
]
