"""The generate loop and the Engine API."""

from ragspec.engine.engine import Engine, Generation, TextStream

__all__ = ["Engine", "Generation", "TextStream"]
