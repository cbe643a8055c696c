"""Helpers shared by the click commands (main CLI, `index`, `bench`)."""

from __future__ import annotations

import functools
import logging
import struct

import click

from ragspec.errors import RagspecError

log = logging.getLogger("ragspec.cli")

# What bad input (a damaged or unreadable file, a value a parser rejects) raises from the
# libraries underneath when no RagspecError names it: shown as one line, not a traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, struct.error)


def _input_errors() -> tuple[type[BaseException], ...]:
    try:  # a damaged model.safetensors (imported lazily: safetensors comes with transformers)
        from safetensors import SafetensorError
    except ImportError:
        return INPUT_ERRORS
    return (*INPUT_ERRORS, SafetensorError)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def library_errors(command):
    """Turn RagspecError, and errors that bad files and values raise, into a one-line `Error: ...`
    and exit code 1 (`ragspec -v` logs where an unexpected one came from)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RagspecError as exc:
            raise click.ClickException(one_line(exc)) from exc
        except _input_errors() as exc:
            log.info("%s", type(exc).__name__, exc_info=True)
            raise click.ClickException(one_line(f"{type(exc).__name__}: {exc}")) from exc

    return wrapper
