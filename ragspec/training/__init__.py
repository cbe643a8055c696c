"""Training a draft model for a target on this machine: data, distillation, evaluation, lookup."""

from ragspec.training.checkpoint import CheckpointError
from ragspec.training.data import DataPlan
from ragspec.training.draft import (
                                    DraftTrainConfig,
                                    DraftTrainResult,
                                    default_draft_dir,
                                    distill_loss,
                                    is_trained,
                                    train_draft,
)
from ragspec.training.evaluate import (
                                    CategoryAcceptance,
                                    evaluate_draft,
                                    format_table,
                                    target_answers,
)
from ragspec.training.resolve import resolve_draft_model

__all__ = [
    "CategoryAcceptance", "CheckpointError", "DataPlan", "DraftTrainConfig", "DraftTrainResult", "default_draft_dir",
    "distill_loss", "evaluate_draft", "format_table", "is_trained", "resolve_draft_model", "target_answers",
    "train_draft",
]
