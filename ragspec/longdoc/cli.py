"""`ragspec ask --doc FILE [QUESTION ...]`: questions over whole documents, one DocumentSession
for all of them (the second and later questions reuse the documents' KV cache). Without questions
on the command line they are read from stdin, one a line, until an empty line or end of input."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import click

from ragspec.longdoc.read import read_document
from ragspec.longdoc.session import DocumentSession


def ask_documents(make_engine: Callable, paths: Sequence[Path], questions: Sequence[str], options: dict,
                  chunks: int | None, stream_answer: Callable) -> None:
    """Stream the answer to each question; `options`: the CLI's generation options (stats,
    no_spec and GenerationRequest fields); `stream_answer(session, question, options)`: the CLI's
    printer of a streamed answer (and its stats), which returns the Generation. The documents are
    read before `make_engine()` loads the model, so a bad file fails at once."""
    show_stats = options["stats"]
    documents = [read_document(path) for path in paths]
    session = DocumentSession(make_engine(), documents, chunks=chunks)
    if show_stats:
        names = ", ".join(d.name for d in session.documents)
        click.echo(f"documents: {names} ({session.document_tokens} prompt tokens before the question)", err=True)
    for question in questions if questions else _stdin_questions():
        if questions and len(questions) > 1:
            click.echo(f"> {question}")
        result = stream_answer(session, question, dict(options))
        if show_stats:
            click.echo(time_split(result), err=True)


def time_split(result) -> str:
    """Where the answer's time went: the prompt's prefill (and how much of the prompt the prefix
    cache held) against decoding."""
    stats = result.stats
    fed = result.prompt_tokens - stats.cached_prompt_tokens
    return (f"time: prefill {stats.prefill_s:.2f} s ({fed} of {result.prompt_tokens} prompt tokens fed, "
            f"{stats.cached_prompt_tokens} from the cache), decode {max(0.0, stats.total_s - stats.prefill_s):.2f} s")


def _stdin_questions() -> Iterator[str]:
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line
