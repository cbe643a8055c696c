"""The generate loop and the Engine API.

Imported on first use (PEP 562): `ragspec.engine.budget` (NodeBudget) must import without
torch, for the vLLM proposer.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Engine": "ragspec.engine.engine",
    "Generation": "ragspec.engine.engine",
    "TextStream": "ragspec.engine.engine",
    "GenerationRequest": "ragspec.engine.request",
    "Piece": "ragspec.engine.request",
}

__all__ = ["Engine", "Generation", "GenerationRequest", "Piece", "TextStream"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ragspec.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
