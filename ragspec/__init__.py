"""ragspec: lossless speculative decoding for RAG and long-document generation.

The engine names (Engine, load_model, ...) are imported on first use (PEP 562), so that
`import ragspec.vllm` or `ragspec.drafting` in an environment without torch/transformers (a
vLLM server's) does not pull the HF engine in.
"""

from __future__ import annotations

import importlib

from ragspec.config import SamplingConfig, SpecConfig
from ragspec.errors import RagspecError
from ragspec.types import DraftTree, SpecStats

_LAZY = {
    "Engine": "ragspec.engine",
    "Generation": "ragspec.engine",
    "GenerationRequest": "ragspec.engine",
    "Piece": "ragspec.engine",
    "TextStream": "ragspec.engine",
    "LoadedModel": "ragspec.models",
    "load_model": "ragspec.models",
    "DocumentSession": "ragspec.longdoc.session",
}

__all__ = [
    "DocumentSession",
    "DraftTree",
    "Engine",
    "Generation",
    "GenerationRequest",
    "LoadedModel",
    "Piece",
    "RagspecError",
    "SamplingConfig",
    "SpecConfig",
    "SpecStats",
    "TextStream",
    "load_model",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ragspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
