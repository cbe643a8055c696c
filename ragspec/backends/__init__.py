"""Target backends: which engine runs the target model's verify forwards (see base.py)."""

from __future__ import annotations

from ragspec.backends.base import TargetBackend, TargetVerifier
from ragspec.errors import ConfigError

BACKENDS = ("transformers", "llamacpp")


def load_target(model=None, backend: str = "transformers", *, device: str | None = None, dtype: str | None = None,
                options=None) -> TargetBackend:
    """The target `model` (None: the embedded default; an HF directory or a .gguf file) on `backend`.
    `options`: a LlamaCppOptions for the llamacpp backend (threads, batch, context)."""
    if backend == "transformers":
        if options is not None:
            raise ConfigError("backend options are for the llamacpp backend")
        from ragspec.models import load_model

        return load_model(model, device=device, dtype=dtype)
    if backend == "llamacpp":
        if device not in (None, "cpu") or dtype not in (None, "auto"):
            raise ConfigError("the llamacpp backend runs the GGUF file's own weights on the CPU: drop --device/--dtype")
        from ragspec.backends.llamacpp import load_llamacpp

        return load_llamacpp(model, options)
    raise ConfigError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")


__all__ = ["BACKENDS", "TargetBackend", "TargetVerifier", "load_target"]
