"""ragspec.index: build, search, add, and every way an index can be missing or broken."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from ragspec.errors import (
    ConfigError, CorpusNotFound, EmptyCorpus, IndexCorrupt, IndexNotFound, IndexVersionMismatch, TokenizerMismatch,
)
from ragspec.index import (
    add_to_index, build_index, build_index_from_texts, list_indexes, open_index, remove_index, tokenizer_fingerprint,
    verify_index,
)
from ragspec.index import versions
from ragspec.index.store import sha256_file
from ragspec.index.corpus import html_to_text

BOOK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus" / "pg1342_pride_and_prejudice.txt"
SMALL = dict(chunk_tokens=64, overlap_tokens=8, progress=False)


def book_paragraphs(start: int, count: int) -> str:
    if not BOOK.is_file():
        pytest.skip(f"corpus file {BOOK} not present")
    text = BOOK.read_text(encoding="utf-8")
    body = text[text.index("It is a truth universally acknowledged"):]
    return "\n\n".join(body.split("\n\n")[start:start + count])


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "opening.txt").write_text(book_paragraphs(0, 6))
    (folder / "notes.md").write_text("# Netherfield\n\nMr. Bingley rents Netherfield Park for four thousand a year.\n")
    (folder / "page.html").write_text(
        "<html><head><style>p{}</style><script>var x=1;</script></head>"
        "<body><h1>Longbourn</h1><p>Mrs. Bennet wants her daughters married.</p></body></html>"
    )
    (folder / "lines.jsonl").write_text(
        json.dumps({"text": "Elizabeth Bennet walks three miles to Netherfield through the mud."}) + "\n"
        + json.dumps({"title": "no text field"}) + "\n"
    )
    (folder / "image.png").write_bytes(b"\x89PNG not text")
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus_dir, tokenizer):
    home = tmp_path_factory.mktemp("home")
    return build_index([corpus_dir], "book", home=home, tokenizer=tokenizer, **SMALL)


@pytest.fixture
def copy_of(built, tmp_path):
    """A private copy of the built index (for tests that damage it)."""
    home = tmp_path / "home"
    shutil.copytree(built.path, home / "book")
    return home


def files_of(home: Path, name: str = "book") -> Path:
    """The directory holding the files of the index's current version."""
    return versions.current(home / name)


def test_build_reads_every_supported_type_and_skips_the_rest(built, corpus_dir):
    sources = {Path(d["source"].split("#")[0]).name for d in built.documents()}
    assert sources == {"opening.txt", "notes.md", "page.html", "lines.jsonl"}
    skipped = dict(built.build_stats.skipped)
    assert "unknown file type .png" in skipped[str(corpus_dir / "image.png")]
    assert 'no "text"' in skipped[f"{corpus_dir / 'lines.jsonl'}#2"]


def test_manifest_and_datastore_layout(built, tokenizer):
    manifest = built.manifest
    assert manifest["format_version"] == 1 and manifest["embedding_dim"] == 384
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert set(manifest["files"]) == {"dense.faiss", "tokens.npy", "suffix.npy"}
    tokens = built.datastore.tokens
    assert tokens.dtype == np.int32 and isinstance(tokens, np.memmap)
    rows = built.chunks(list(range(built.num_chunks)))
    for row in rows.values():  # each chunk's tokens re-encode its text, a separator follows
        ids = tokens[row["token_start"]:row["token_end"]].tolist()
        assert tokenizer.decode(ids).strip() == row["text"].strip()
        assert tokens[row["token_end"]] == -1
    assert len(tokens) == sum(r["token_end"] - r["token_start"] + 1 for r in rows.values())


def test_fingerprint_matches_loaded_model(tokenizer):
    from ragspec.models import LoadedModel

    assert tokenizer_fingerprint(tokenizer) == LoadedModel(None, tokenizer, "x").tokenizer_fingerprint


def test_search_returns_the_relevant_chunk_with_its_tokens(built):
    hits = built.search("Who rents Netherfield Park and for how much?", k=3)
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    assert "four thousand" in hits[0].text and hits[0].source.endswith("notes.md")
    ids = built.datastore.tokens[hits[0].token_start:hits[0].token_end]
    length, ends = built.datastore.longest_match(np.asarray(ids[:6]), 2, 16, 8, [(hits[0].token_start, hits[0].token_end)])
    assert length == 6 and ends.tolist() == [hits[0].token_start + 6]
    assert built.search("anything", k=0) == []


def test_html_is_stripped_to_text():
    text = html_to_text("<html><head><title>T</title><script>bad()</script></head><body><p>a &amp; b</p>x</body>")
    assert "bad" not in text and "a & b" in text and "<" not in text


def test_add_indexes_only_new_documents(built, copy_of, corpus_dir, tmp_path, tokenizer):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "later.txt").write_text(book_paragraphs(30, 3))
    before = open_index("book", copy_of)
    updated = add_to_index("book", [corpus_dir, extra], home=copy_of, tokenizer=tokenizer, progress=False)
    assert updated.build_stats.num_documents == 1
    assert updated.num_documents == before.num_documents + 1
    assert updated.num_chunks == before.num_chunks + updated.build_stats.num_chunks
    assert np.array_equal(updated.datastore.tokens[:len(before.datastore)], before.datastore.tokens)
    assert updated.dense.ntotal == updated.num_chunks
    verify_index("book", copy_of)
    again = add_to_index("book", [extra], home=copy_of, tokenizer=tokenizer, progress=False)
    assert again.build_stats.num_documents == 0 and again.num_chunks == updated.num_chunks


def test_missing_index_names_the_fix(tmp_path):
    with pytest.raises(IndexNotFound, match="ragspec index build"):
        open_index("nope", tmp_path)


def test_truncated_file_is_detected_by_open_and_verify(copy_of):
    tokens = files_of(copy_of) / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-8])
    for check in (open_index, verify_index):
        with pytest.raises(IndexCorrupt, match="tokens.npy.*truncated"):
            check("book", copy_of)
    assert tokens.exists()  # nothing deleted


def test_flipped_byte_is_detected_by_verify(copy_of):
    dense = files_of(copy_of) / "dense.faiss"
    data = bytearray(dense.read_bytes())
    data[-10] ^= 0xFF
    dense.write_bytes(bytes(data))
    open_index("book", copy_of)  # sizes still match: open stays cheap
    with pytest.raises(IndexCorrupt, match="dense.faiss fails its sha256"):
        verify_index("book", copy_of)


def test_missing_file_is_reported(copy_of):
    (files_of(copy_of) / "suffix.npy").unlink()
    with pytest.raises(IndexCorrupt, match="suffix.npy is missing"):
        open_index("book", copy_of)


def test_format_version_mismatch(copy_of):
    with sqlite3.connect(files_of(copy_of) / "meta.sqlite") as db:
        db.execute("update manifest set value = '99' where key = 'format_version'")
    with pytest.raises(IndexVersionMismatch, match="version 99.*rebuild"):
        open_index("book", copy_of)


def test_tokenizer_mismatch_names_both_fingerprints(built):
    built.check_tokenizer(built.manifest["tokenizer_fingerprint"])
    with pytest.raises(TokenizerMismatch) as error:
        built.check_tokenizer("0123456789abcdef")
    assert "0123456789abcdef" in str(error.value) and built.manifest["tokenizer_fingerprint"] in str(error.value)
    assert "--model" in str(error.value)


def test_empty_corpus_and_missing_paths(tmp_path, tokenizer):
    (tmp_path / "blank.txt").write_text("   \n")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(EmptyCorpus, match="no text to index"):
        build_index([tmp_path], "empty", home=tmp_path / "home", tokenizer=tokenizer, **SMALL)
    with pytest.raises(CorpusNotFound, match="no-such-dir"):
        build_index([tmp_path / "no-such-dir"], "x", home=tmp_path / "home", tokenizer=tokenizer, **SMALL)
    assert list_indexes(tmp_path / "home") == []


def test_non_utf8_file_is_skipped_with_a_reason(tmp_path, tokenizer):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("Mr. Darcy is proud.")
    index = build_index([tmp_path], "enc", home=tmp_path / "home", tokenizer=tokenizer, **SMALL)
    assert index.num_documents == 1
    assert "not UTF-8" in dict(index.build_stats.skipped)[str(tmp_path / "latin1.txt")]


def test_interrupted_build_leaves_the_previous_index(copy_of, corpus_dir, tokenizer, monkeypatch):
    import ragspec.index.build as build_module

    def interrupted(tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "build_suffix_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index([corpus_dir / "notes.md"], "book", home=copy_of, tokenizer=tokenizer, **SMALL)
    assert sorted(p.name for p in copy_of.iterdir()) == ["book"]  # no temporary dirs left
    index = verify_index("book", copy_of)
    assert index.num_documents == 4 and index.search("Netherfield", k=1)


def test_rebuild_replaces_and_remove_deletes(copy_of, corpus_dir, tokenizer):
    index = build_index([corpus_dir / "notes.md"], "book", home=copy_of, tokenizer=tokenizer, **SMALL)
    assert index.num_documents == 1 and list_indexes(copy_of) == ["book"]
    remove_index("book", copy_of)
    assert list_indexes(copy_of) == []
    with pytest.raises(IndexNotFound):
        remove_index("book", copy_of)


@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF64,Flat"])
def test_other_faiss_factories(tmp_path, tokenizer, factory):
    texts = [(f"p{i}", book_paragraphs(i * 2, 2)) for i in range(3)]
    index, stats = build_index_from_texts(texts, "f", tmp_path, tokenizer=tokenizer, faiss_factory=factory,
                                          chunk_tokens=64, overlap_tokens=8)
    assert stats.tokens_per_s > 0 and stats.bytes_per_token > 0
    assert index.manifest["faiss_factory_effective"] in {"HNSW32,Flat", "IVF1,Flat"}
    best = index.search(texts[1][1][:200], k=2)[0]
    assert best.source == "p1"


def test_bad_faiss_factory_and_chunking_are_config_errors(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="factory string"):
        build_index_from_texts([("a", "some text")], "f", tmp_path, tokenizer=tokenizer, faiss_factory="Bogus")
    with pytest.raises(ConfigError, match="overlap"):
        build_index_from_texts([("a", "some text")], "f", tmp_path, tokenizer=tokenizer, chunk_tokens=8,
                               overlap_tokens=8)


def test_readers_never_move_anything(copy_of):
    """An older ragspec's build stopped between its two renames: a reader reports it, moves nothing."""
    aside = copy_of / ".old-book-x1"
    aside.mkdir()
    (copy_of / "book").rename(aside / "book")
    with pytest.raises(IndexNotFound, match="older ragspec left it in .*old-book-x1"):
        open_index("book", copy_of)
    assert sorted(p.name for p in copy_of.iterdir()) == [".old-book-x1"]


def test_a_reader_at_every_step_of_a_rebuild_sees_a_whole_index(copy_of, corpus_dir, tokenizer, monkeypatch):
    """Item 8: after each rename a rebuild makes, a reader opens the old index or the new one,
    whole, and changes nothing; the rebuild then succeeds (the old swap failed here)."""
    import os

    real_replace, seen, reading = os.replace, [], []

    def replace_then_read(src, dst):
        real_replace(src, dst)
        if reading:
            return
        reading.append(True)
        try:
            index = verify_index("book", copy_of)
            seen.append(index.num_documents)
            index.close()
        finally:
            reading.clear()

    monkeypatch.setattr(os, "replace", replace_then_read)
    index = build_index([corpus_dir / "notes.md"], "book", home=copy_of, tokenizer=tokenizer, **SMALL)
    monkeypatch.undo()
    assert index.num_documents == 1 and len(seen) >= 2 and set(seen) <= {4, 1} and seen[-1] == 1
    verify_index("book", copy_of)


def test_an_open_index_survives_rebuilds_and_is_collected_once_closed(copy_of, corpus_dir, tokenizer):
    old = open_index("book", copy_of)
    old_files = old.files
    for _ in range(2):
        build_index([corpus_dir / "notes.md"], "book", home=copy_of, tokenizer=tokenizer, **SMALL)
    assert old_files.is_dir() and old.search("Netherfield", k=1) and old.num_documents == 4
    old.close()
    new = build_index([corpus_dir / "notes.md"], "book", home=copy_of, tokenizer=tokenizer, **SMALL)
    versions_left = [p.name for p in (copy_of / "book").iterdir() if p.is_dir()]
    assert versions_left == [new.files.name], "old versions no one reads are deleted"


def test_an_index_in_the_old_layout_opens_and_a_rebuild_replaces_it(built, tmp_path, corpus_dir, tokenizer):
    home = tmp_path / "home"
    shutil.copytree(built.files, home / "book")  # files directly in the folder, no CURRENT
    (home / "book" / "past_responses.npy").write_bytes(b"learned")
    assert verify_index("book", home).num_documents == 4 and list_indexes(home) == ["book"]
    index = build_index([corpus_dir / "notes.md"], "book", home=home, tokenizer=tokenizer, **SMALL)
    assert index.num_documents == 1
    assert sorted(p.name for p in (home / "book").iterdir()) == [".lock", "CURRENT", index.files.name]


def test_building_into_a_folder_that_is_not_an_index_is_refused(tmp_path, corpus_dir, tokenizer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "mine.txt").write_text("not an index")
    with pytest.raises(ConfigError, match="is not an index"):
        build_index([corpus_dir / "notes.md"], "docs", home=tmp_path, tokenizer=tokenizer, **SMALL)
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["mine.txt"]


def test_name_with_a_trailing_newline_is_refused(tmp_path, corpus_dir, tokenizer):
    for name in ("docs\n", "docs/..", "", "-x"):
        with pytest.raises(ConfigError, match="index name"):
            build_index([corpus_dir / "notes.md"], name, home=tmp_path, tokenizer=tokenizer, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_manifest_without_num_tokens_is_corrupt(copy_of):
    with sqlite3.connect(files_of(copy_of) / "meta.sqlite") as db:
        db.execute("delete from manifest where key = 'num_tokens'")
    for check in (open_index, verify_index):
        with pytest.raises(IndexCorrupt, match="lacks num_tokens"):
            check("book", copy_of)


def test_token_ids_outside_the_vocabulary_are_corrupt(copy_of, built):
    tokens = files_of(copy_of) / "tokens.npy"
    bad = np.load(tokens)
    bad[3] = built.manifest["vocab_size"] + 7
    np.save(tokens, bad)  # same size; and the manifest records the new checksum: only the ids are wrong
    records = dict(built.manifest["files"], **{"tokens.npy": {"sha256": sha256_file(tokens), "bytes": tokens.stat().st_size}})
    with sqlite3.connect(files_of(copy_of) / "meta.sqlite") as db:
        db.execute("update manifest set value = ? where key = 'files'", [json.dumps(records)])
    with pytest.raises(IndexCorrupt, match="token ids outside"):
        verify_index("book", copy_of)
    index = open_index("book", copy_of)
    with pytest.raises(IndexCorrupt, match="token ids outside"):  # what an Engine calls on each request
        index.check_tokenizer(index.manifest["tokenizer_fingerprint"])


def test_remove_a_symlinked_index_removes_only_the_link(copy_of, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (copy_of / "book").rename(elsewhere)
    (copy_of / "book").symlink_to(elsewhere, target_is_directory=True)
    assert open_index("book", copy_of).num_documents == 4
    remove_index("book", copy_of)
    assert not (copy_of / "book").exists() and versions.current(elsewhere) is not None
    assert open_index(elsewhere).num_documents == 4
