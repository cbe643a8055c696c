"""The generate loop and the Engine API."""

from ragspec.engine.engine import Engine, Generation, TextStream
from ragspec.engine.request import GenerationRequest, Piece

__all__ = ["Engine", "Generation", "GenerationRequest", "Piece", "TextStream"]
