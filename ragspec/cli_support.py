"""Helpers shared by the click commands (main CLI, `index`, `bench`)."""

from __future__ import annotations

import functools

import click

from ragspec.errors import RagspecError


def library_errors(command):
    """Turn RagspecError into a one-line `Error: ...` and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RagspecError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper
