"""Resumable training state: the student's trainable weights, AdamW's state, the step.

One file written atomically (temp file + rename), read back with `torch.load(weights_only=True)`:
plain dicts of tensors, numbers and strings, no pickled objects. A damaged or foreign file is a
CheckpointError naming it and the fix, never a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ragspec.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "ragspec-draft-checkpoint-1"


class CheckpointError(ConfigError):
    """A training checkpoint that cannot be read, or that belongs to other settings."""


@dataclass
class TrainState:
    step: int  # optimizer steps done; the data position is a function of it (see DraftTrainer)
    model: dict[str, torch.Tensor]  # the student's trainable weights
    optimizer: dict  # torch.optim.AdamW.state_dict()
    settings: str  # JSON of the settings that must match on resume
    losses: list[float]  # [step] training loss at every step done


def save_checkpoint(path: Path, state: TrainState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "step": state.step, "model": state.model, "optimizer": state.optimizer,
               "settings": state.settings, "losses": torch.tensor(state.losses, dtype=torch.float64)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, settings: str) -> TrainState:
    """The state saved at `path`; CheckpointError if it is damaged or was made with other settings."""
    fix = f"delete {path} (or train with --restart) to start over"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no training checkpoint at {path} to resume from") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file raises many kinds (RuntimeError, EOFError, UnpicklingError...)
        raise CheckpointError(f"training checkpoint {path} is damaged ({type(exc).__name__}): {fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ragspec draft training checkpoint: {fix}")
    if payload["settings"] != settings:
        differ = _differing(json.loads(payload["settings"]), json.loads(settings))
        raise CheckpointError(f"training checkpoint {path} was made with other settings ({differ}): "
                              f"train with those settings to resume it, or {fix}")
    return TrainState(int(payload["step"]), payload["model"], payload["optimizer"], payload["settings"],
                      [float(x) for x in payload["losses"].tolist()])


def _differing(saved: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in keys)
