"""`--draft-model auto|PATH`: which draft model directory a target drafts with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ragspec.errors import ModelNotFound, TokenizerMismatch
from ragspec.models import LoadedModel
from ragspec.training.draft import (
    METADATA_FILE,
    DraftTrainConfig,
    default_draft_dir,
    is_trained,
    train_draft,
)

log = logging.getLogger(__name__)

AUTO = "auto"


def resolve_draft_model(spec: str, target: LoadedModel, *, train_if_missing: bool = True,
                        config: DraftTrainConfig | None = None) -> Path:
    """The HF model directory `spec` names for drafting for `target`.

    "auto": the draft model trained for this target (`default_draft_dir`); when there is none
    yet, it is trained now with `config` (default settings, ~25-45 min on a 2-core CPU) and a
    warning says so, unless `train_if_missing` is False (ModelNotFound then). Anything else is a
    path to an HF model directory. A draft trained by ragspec for another tokenizer is refused."""
    if spec == AUTO:
        path = default_draft_dir(target)
        if not is_trained(path):
            if not train_if_missing:
                raise ModelNotFound(f"no draft model trained for {target.name} yet (looked in {path}): "
                                    "run `ragspec draft train` first")
            log.warning("no draft model for %s in %s yet: training one now with default settings (about 25-45 "
                        "minutes on a 2-core CPU; `ragspec draft train` does the same with a progress bar)",
                        target.name, path)
            train_draft(target, config or DraftTrainConfig(), path, resume=(path / "training" / "checkpoint.pt").is_file())
    else:
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"no draft model at {spec}: give an HF model directory (with config.json) or 'auto'")
    _check_tokenizer(path, target)
    return path


def _check_tokenizer(path: Path, target: LoadedModel) -> None:
    """Drafts must be token ids of the target's vocabulary: a ragspec-trained draft says whose."""
    metadata = path / METADATA_FILE
    if not metadata.is_file():
        return
    try:
        fingerprint = json.loads(metadata.read_text()).get("tokenizer_fingerprint")
    except (OSError, ValueError):
        return
    if fingerprint and fingerprint != target.tokenizer_fingerprint:
        raise TokenizerMismatch(f"draft model {path} was trained for another tokenizer ({fingerprint}) than "
                                f"{target.name}'s ({target.tokenizer_fingerprint})")
