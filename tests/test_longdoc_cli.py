"""`ragspec ask --doc`: bad documents are one-line errors before any model loads; on the real
model, several questions in one invocation stream their answers, the later ones from the
document's cached KV, and --no-spec with the questions read from stdin prints the same greedy
answers."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from conftest import book_paragraphs
from ragspec.cli import main

TINY = ["--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu"]


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_bad_documents_are_one_line_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "table.csv").write_text("a,b", encoding="utf-8")
    assert "document not found" in one_line_error(run("ask", "--doc", str(tmp_path / "nope.md"), "Why?", *TINY))
    assert "is empty" in one_line_error(run("ask", "--doc", str(tmp_path / "empty.txt"), "Why?", *TINY))
    assert "not a readable PDF" in one_line_error(run("ask", "--doc", str(tmp_path / "broken.pdf"), "Why?", *TINY))
    assert "unsupported document type '.csv'" in one_line_error(run("ask", "--doc", str(tmp_path / "table.csv"), "Q?"))


def test_index_or_doc_exactly_one(tmp_path):
    (tmp_path / "d.txt").write_text("text", encoding="utf-8")
    neither = run("ask", "Why?")
    assert neither.exit_code == 2 and "--index NAME or --doc FILE" in neither.output
    both = run("ask", "--doc", str(tmp_path / "d.txt"), "--index", "x", "Why?")
    assert both.exit_code == 2 and "--index NAME or --doc FILE" in both.output


@pytest.mark.slow
def test_ask_doc_answers_several_questions_from_the_cached_document(tmp_path):
    doc = tmp_path / "chapter.md"
    doc.write_text("# Chapter 1\n\n" + "\n\n".join(book_paragraphs(6)), encoding="utf-8")
    questions = ["Who has taken Netherfield Park?", "Is Mr. Bingley married?"]
    spec = run("ask", "--doc", str(doc), *questions, "--stats", *TINY)
    assert spec.exit_code == 0, spec.output
    assert [line for line in spec.stdout.splitlines() if line.startswith("> ")] == [f"> {q}" for q in questions]
    assert "mean acceptance length" in spec.stderr and "mean acceptance length" not in spec.stdout
    fed = [(int(a), int(b), int(c)) for a, b, c in
           re.findall(r"time: prefill [\d.]+ s \((\d+) of (\d+) prompt tokens fed, (\d+) from the cache\)", spec.stderr)]
    assert len(fed) == 2
    assert fed[0][2] == 0 and fed[1][2] > 200 and fed[1][0] < 40  # the second question feeds only itself
    plain = run("ask", "--doc", str(doc), "--no-spec", *TINY, input="".join(f"{q}\n" for q in questions) + "\n")
    assert plain.exit_code == 0, plain.output
    spec_answers = [line for line in spec.stdout.splitlines() if not line.startswith("> ")]
    plain_answers = [line.removeprefix("> ") for line in plain.stdout.splitlines()][: len(spec_answers)]
    assert plain_answers == spec_answers, "questions from stdin, --no-spec: the same greedy answers"
