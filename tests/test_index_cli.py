"""`ragspec index ...` end to end through click's CliRunner on a tiny corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ragspec.index import versions
from ragspec.index_cli import index_group

BOOK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus" / "pg1342_pride_and_prejudice.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if not BOOK.is_file():
        pytest.skip(f"corpus file {BOOK} not present")
    text = BOOK.read_text(encoding="utf-8")
    body = text[text.index("It is a truth universally acknowledged"):]
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "chapter1.txt").write_text("\n\n".join(body.split("\n\n")[:5]))
    (folder / "facts.jsonl").write_text(json.dumps({"text": "Netherfield Park is let at last, to Mr. Bingley."}) + "\n")
    (folder / "skip.pdf").write_bytes(b"%PDF-1.4")
    return folder


def invoke(*args, env=None):
    return CliRunner().invoke(index_group, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory, corpus) -> Path:
    home = tmp_path_factory.mktemp("home")
    result = invoke("build", corpus, "--name", "book", "--chunk-tokens", 64, "--overlap-tokens", 8, "--quiet",
                    "--home", home)
    assert result.exit_code == 0, result.output
    assert "Warning: skipped" in result.stderr and "skip.pdf" in result.stderr
    assert "2 new document(s)" in result.stdout
    return home


def test_query_shows_scores_and_sources(home):
    result = invoke("query", "book", "Who took Netherfield Park?", "-k", 2, "--home", home)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line[:2] in ("1.", "2.")]
    assert len(lines) == 2 and "score" in lines[0] and "facts.jsonl#1" in lines[0]


def test_info_ls_verify(home):
    info = invoke("info", "book", "--home", home)
    assert info.exit_code == 0 and "tokenizer_fingerprint" in info.stdout and "file tokens.npy" in info.stdout
    manifest = json.loads(invoke("info", "book", "--json", "--home", home).stdout)
    assert manifest["num_documents"] == 2 and manifest["chunk_tokens"] == 64
    assert invoke("ls", "--home", home).stdout.split() == ["book"]
    assert invoke("ls", env={"RAGSPEC_INDEX_HOME": str(home)}).stdout.split() == ["book"]
    verify = invoke("verify", "book", "--home", home)
    assert verify.exit_code == 0 and "ok" in verify.stdout


def test_add_then_rm(home, tmp_path, corpus):
    (tmp_path / "more.md").write_text("# Meryton\n\nThe regiment is quartered in Meryton for the winter.\n")
    added = invoke("add", "book", tmp_path, corpus, "--quiet", "--home", home)
    assert added.exit_code == 0, added.output
    assert "1 new document(s)" in added.stdout and "3 document(s)" in added.stdout
    hit = invoke("query", "book", "Where is the regiment quartered?", "-k", 1, "--home", home)
    assert "more.md" in hit.stdout
    assert invoke("rm", "book", "--yes", "--home", home).exit_code == 0
    assert invoke("ls", "--home", home).stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "missing"], "no index at"),
        (["query", "missing", "x"], "ragspec index build"),
        (["verify", "missing"], "no index at"),
        (["rm", "missing", "--yes"], "no index at"),
        (["add", "missing", "."], "no index at"),
        (["build", "/no/such/path", "--name", "x", "--quiet"], "no such file or directory"),
        (["build", ".", "--name", "bad/name", "--quiet"], "index name"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    result = invoke(*args, "--home", tmp_path / "empty-home")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_corpus_and_corrupt_index_errors(tmp_path, home, corpus):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "empty.txt").write_text("")
    result = invoke("build", tmp_path / "docs", "--name", "e", "--quiet", "--home", tmp_path)
    assert result.exit_code == 1 and "Error: no text to index" in result.stderr
    build = invoke("build", corpus, "--name", "c", "--chunk-tokens", 64, "--overlap-tokens", 8, "--quiet",
                   "--home", tmp_path)
    assert build.exit_code == 0, build.output
    suffix = versions.current(tmp_path / "c") / "suffix.npy"
    suffix.write_bytes(suffix.read_bytes()[:100])
    result = invoke("verify", "c", "--home", tmp_path)
    assert result.exit_code == 1 and "suffix.npy" in result.stderr and "rebuild" in result.stderr
    assert suffix.exists()


def test_every_command_help_has_an_example():
    for name, command in index_group.commands.items():
        assert "Example:" in (command.help or ""), name


def test_build_from_a_recipe(tmp_path, corpus):
    recipe = tmp_path / "book.toml"
    recipe.write_text(f'name = "r"\npaths = ["{corpus / "facts.jsonl"}"]\nchunk_tokens = 32\noverlap_tokens = 4\n')
    result = invoke("build", "--recipe", recipe, "--quiet", "--home", tmp_path / "home")
    assert result.exit_code == 0, result.output
    manifest = json.loads(invoke("info", "r", "--json", "--home", tmp_path / "home").stdout)
    assert manifest["chunk_tokens"] == 32 and manifest["num_documents"] == 1
    recipe.write_text('name = "r"\npaths = ["x"]\nchunk_size = 3\n')
    bad = invoke("build", "--recipe", recipe, "--home", tmp_path / "home")
    assert bad.exit_code == 1 and "unknown keys: ['chunk_size']" in bad.stderr
    assert invoke("build", "--home", tmp_path).exit_code == 2  # neither paths nor recipe


def test_shipped_recipes_parse():
    from ragspec.index.recipe import load_recipe

    for recipe in (Path(__file__).resolve().parents[1] / "indexes").glob("*.toml"):
        assert load_recipe(recipe).name
