"""ragspec: lossless speculative decoding for RAG and long-document generation."""

from ragspec.config import SamplingConfig, SpecConfig
from ragspec.engine import Engine, Generation, GenerationRequest, Piece, TextStream
from ragspec.errors import RagspecError
from ragspec.models import LoadedModel, load_model
from ragspec.types import DraftTree, SpecStats

__all__ = [
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
