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


@pytest.mark.parametrize("body, message", [
    ('name = "r"\npaths = ["x"]\nchunk_tokens = "big"\n', "chunk_tokens must be a whole number"),
    ('name = "r"\npaths = ["x"]\nchunk_tokens = 1.5\n', "chunk_tokens must be a whole number"),
    ('name = "r"\npaths = ["x"]\nmodel = 3\n', "model must be a string"),
    ('name = "r"\npaths = "x"\n', "paths must be a list"),
    ('name = 7\npaths = ["x"]\n', "name must be a string"),
    ("name = \"caf\xe9\"\npaths = [\"x\"]\n".encode("latin-1"), "not UTF-8"),
    (b"\x00\xff\xfe garbage", "not UTF-8"),
    ('name = "r"\npaths = [', "cannot read recipe"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, body, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_bytes(body if isinstance(body, bytes) else body.encode())
    result = invoke("build", "--recipe", recipe, "--quiet", "--home", tmp_path / "home")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("factory, message", [("IDMap,Flat", "cannot add and search"), ("HNSW1", "crashed"),
                                              ("Bogus", "cannot parse")])
def test_unusable_faiss_factories_are_one_line_errors(tmp_path, corpus, factory, message):
    result = invoke("build", corpus / "facts.jsonl", "--name", "f", "--faiss", factory, "--quiet", "--home", tmp_path)
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "f").exists()


@pytest.fixture(scope="module")
def spare(tmp_path_factory, corpus) -> Path:
    """A home with index "book" that no test changes (test_add_then_rm removes the shared one)."""
    home = tmp_path_factory.mktemp("spare")
    result = invoke("build", corpus / "facts.jsonl", "--name", "book", "--quiet", "--home", home)
    assert result.exit_code == 0, result.output
    return home


def _copy(home, tmp_path):
    import shutil

    shutil.copytree(home / "book", tmp_path / "book")
    return versions.current(tmp_path / "book")


def test_verify_reports_a_manifest_without_num_tokens(spare, tmp_path):
    import sqlite3

    with sqlite3.connect(_copy(spare, tmp_path) / "meta.sqlite") as db:
        db.execute("delete from manifest where key = 'num_tokens'")
    result = invoke("verify", "book", "--home", tmp_path)
    assert result.exit_code == 1 and "lacks num_tokens" in result.stderr and "rebuild" in result.stderr


def test_rm_of_a_symlinked_index_removes_only_the_link(spare, tmp_path):
    _copy(spare, tmp_path / "real")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "book").symlink_to(tmp_path / "real" / "book")
    result = invoke("rm", "book", "--yes", "--home", tmp_path / "links")
    assert result.exit_code == 0, result.output
    assert "which is kept" in result.stdout and not (tmp_path / "links" / "book").exists()
    assert invoke("verify", "book", "--home", tmp_path / "real").exit_code == 0


def test_names_with_a_trailing_newline_are_refused(tmp_path, corpus):
    result = invoke("build", corpus, "--name", "docs\n", "--quiet", "--home", tmp_path)
    assert result.exit_code == 1 and "index name" in result.stderr and list(tmp_path.iterdir()) == []
