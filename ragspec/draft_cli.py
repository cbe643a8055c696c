"""`ragspec draft ...`: train and evaluate a small draft model for a target (ragspec.training)."""

from __future__ import annotations

import click


@click.group("draft")
def draft_group():
    """Make a small draft model from the target (layer-pruned, distilled) and measure it."""
