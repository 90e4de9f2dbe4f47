"""The one resumable train-state file of :func:`training.fit.fit`.

Written after every epoch (atomically: a temporary file renamed into place) and read with
``torch.load(weights_only=True)`` (tensors and plain types only, no pickled objects). It holds
the model, optimizer, schedule and EMA weights, the RNG states, the history, the recipe, the
data fingerprint and the number of processes; a resume must match the last three.
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.recipe import Recipe, TrainingError

if TYPE_CHECKING:
    import torch

#: ``format`` of every train-state file.
STATE_FORMAT = "cxr-triage-train-state"


def recipe_key(recipe: Recipe) -> str:
    """The recipe as stored in a state (canonical JSON)."""
    return json.dumps(recipe.to_dict(), sort_keys=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch CPU RNG states as tensors and strings."""
    import torch

    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (with its ``format``) to ``path`` atomically."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": STATE_FORMAT, **state}, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any]:
    """Read a train state.

    Raises
    ------
    TrainingError
        Missing file, not a torch file, or not a cxr-triage train state.
    """
    import torch

    if not path.is_file():
        raise TrainingError(f"resume state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"{path}: not a readable training state ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a cxr-triage training state")
    return state


def check_resumable(
    state: Mapping[str, Any], path: Path, recipe: Recipe, fingerprint: str, world: int
) -> None:
    """Refuse a state of another recipe, other data or another number of processes."""
    if state.get("recipe") != recipe_key(recipe):
        raise TrainingError(f"{path} was written by another recipe; remove it or use a new --out")
    if state.get("fingerprint", "") != fingerprint:
        raise TrainingError(
            f"{path} was written for other training data (images, labels or fold); remove it"
        )
    if int(state.get("world_size", 1)) != world:
        raise TrainingError(
            f"{path} was written by {int(state.get('world_size', 1))} processes, this run has "
            f"{world}: the schedule's step count would differ"
        )


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps the optimizer has taken (AdamW keeps the count per parameter)."""
    for values in optimizer.state.values():
        step = values.get("step")
        if step is not None:
            return int(step)
    return 0


__all__ = [
    "STATE_FORMAT",
    "check_resumable",
    "load_state",
    "optimizer_steps",
    "recipe_key",
    "rng_state",
    "save_state",
    "set_rng_state",
]
