"""The click CLI on the real embedded model (tiny outputs): generate, chat, ask, and the one-line
`Error: ...` with exit code 1 for library errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import DATA_DIR, FLAT_CURVE
from ragspec.cli import main

pytestmark = pytest.mark.slow  # each command loads the embedded model
BOOK = DATA_DIR / "corpus" / "pg1342_pride_and_prejudice.txt"
TINY = ["--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tokenizer):
    from ragspec.index import build_index_from_texts

    if not BOOK.is_file():
        pytest.skip(f"corpus file {BOOK} not present")
    text = BOOK.read_text(encoding="utf-8")
    body = text[text.index("It is a truth universally acknowledged"):]
    texts = [(f"chapter1-{i}", p) for i, p in enumerate(body.split("\n\n")[:30]) if p.strip()]
    home = tmp_path_factory.mktemp("indexes")
    build_index_from_texts(texts, "austen", home=home, tokenizer=tokenizer, chunk_tokens=64, overlap_tokens=8)
    return home


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def assert_one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_generate_prints_the_reply_and_stats(tmp_path):
    spec = run("generate", "Name three colours.", "--stats", *TINY)
    assert spec.exit_code == 0, spec.output
    assert spec.stdout.strip(), "no reply printed"
    assert "mean acceptance length" in spec.stderr and "mean acceptance length" not in spec.stdout
    assert "tok/s" in spec.stderr
    plain = run("generate", "Name three colours.", "--no-spec", *TINY)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == spec.stdout, "--no-spec must print the same greedy reply"
    assert plain.stderr == "" or "mean acceptance length" not in plain.stderr


def test_generate_raw_prompt():
    result = run("generate", "The capital of France is", "--raw", *TINY)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_chat_ends_on_an_empty_line():
    result = run("chat", "--stats", *TINY, input="hi\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("> ") >= 2  # asked twice: once answered, once ended
    assert "mean acceptance length" in result.stderr


def test_chat_ends_on_end_of_input():
    result = run("chat", *TINY, input="")
    assert result.exit_code == 0, result.output


def test_ask_shows_sources(home):
    result = run("ask", "Who rents Netherfield Park?", "--index", "austen", "--home", str(home), "-k", "3",
                 "--show-sources", "--stats", *TINY)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    sources = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split()[0] for line in sources] == ["[1]", "[2]", "[3]"]
    assert any("Netherfield" in line for line in sources)
    assert "mean acceptance length" in result.stderr


def test_ask_scope_reaches_the_datastore_drafter(home, monkeypatch):
    """--scope index gives the request's datastore drafter the whole index (no allowed ranges);
    --scope retrieved, the retrieved chunks' token ranges. Each drafter is asked for drafts."""
    from ragspec.drafting import datastore
    from ragspec.engine.rag import build_rag_prompt
    from ragspec.index import open_index

    seen: list[list] = []  # [allowed ranges, propose calls] per drafter made

    class Recording(datastore.DatastoreDrafter):
        def __init__(self, store, allowed_ranges=None, *args, **kwargs):
            super().__init__(store, allowed_ranges, *args, **kwargs)
            seen.append([allowed_ranges, 0])

        def propose(self, context):
            seen[-1][1] += 1
            return super().propose(context)

    monkeypatch.setattr(datastore, "DatastoreDrafter", Recording)
    # the curve a busy machine measures can turn speculation off; a flat one keeps it on
    monkeypatch.setattr("ragspec.engine.engine.load_or_measure_curve", lambda target: FLAT_CURVE)
    question = "Who rents Netherfield Park?"
    ranges = build_rag_prompt(open_index("austen", home), question, 2).token_ranges
    for scope in ("index", "retrieved"):
        result = run("ask", question, "--index", "austen", "--home", str(home), "-k", "2", "--scope", scope, *TINY)
        assert result.exit_code == 0, result.output
    assert [allowed for allowed, _ in seen] == [None, ranges]
    assert all(calls > 0 for _, calls in seen)


def test_ask_missing_index_is_a_one_line_error(home):
    result = run("ask", "Who?", "--index", "no-such-index", "--home", str(home), *TINY)
    line = assert_one_line_error(result)
    assert "no-such-index" in line and "austen" in line


def test_unknown_model_is_a_one_line_error(tmp_path):
    result = run("generate", "hi", "--model", "/nonexistent", *TINY)
    line = assert_one_line_error(result)
    assert "/nonexistent" in line
    result = run("ask", "hi", "--index", "x", "--home", str(tmp_path), "--model", str(tmp_path / "nope"), *TINY)
    assert_one_line_error(result)


@pytest.mark.parametrize("command", [["bench", "--help"], ["index", "--help"], ["--help"], ["ask", "--help"]])
def test_help(command):
    result = run(*command)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_help_shows_examples():
    for command in ("generate", "chat", "ask"):
        assert "Example:" in run(command, "--help").stdout
