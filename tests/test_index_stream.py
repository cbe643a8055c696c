"""Streaming index builds (issue 14 item 4): memory bounded by a batch, not by the corpus; the
on-disk IVF dense index; build time and peak memory reported."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BOOK

from ragspec.index import add_to_index, build_index, verify_index
from ragspec.index.datastore import build_suffix_array

SMALL_TOKENS = 300_000  # corpus of the small build, in target tokens (about 2 copies of the book)
GROWTH = 4  # the large build reads this many times more text
SUFFIX_ARRAY_BYTES_PER_TOKEN = 8  # uint32 symbols + int32 suffix array: what a build holds per token
FLAT_BYTES_PER_VALUE = 3 * 4  # a Flat index's float32 codes, x3: its std::vector doubles (old + new buffer)
CHUNK_TOKENS = 512
SLACK_BYTES = 24 << 20  # allocator noise, SQLite page cache, FAISS/tokenizer scratch


@pytest.fixture(scope="module")
def static_embedder() -> str:
    """all-MiniLM-L6-v2's token table, mean-pooled (fast enough to embed millions of tokens here)."""
    from ragspec.iterative.corpus import encoder_path

    return encoder_path("minilm-static")


def write_book_jsonl(path: Path, tokens: int) -> Path:
    """Copies of the book as JSONL lines of ~40 paragraphs, each line with its own id in its text."""
    if not BOOK.is_file():
        pytest.skip(f"corpus file {BOOK} not present")
    paragraphs = [p for p in BOOK.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    chars, copy = int(tokens * 4.2), 0  # ~4.2 characters per SmolLM2 token on this book
    with open(path, "w", encoding="utf-8") as out:
        while chars > 0:
            for start in range(0, len(paragraphs), 40):
                text = f"[copy {copy} part {start}]\n\n" + "\n\n".join(paragraphs[start:start + 40])
                out.write(json.dumps({"id": f"{copy}-{start}", "text": text}) + "\n")
                chars -= len(text)
                if chars <= 0:
                    break
            copy += 1
    return path


_CHILD = """
import json, resource, sys
from pathlib import Path
from transformers import AutoTokenizer
from ragspec.index import build_index
home, embedder, tokenizer_dir, chunk_tokens, *corpora = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for number, corpus in enumerate(corpora):
    before = peak()
    index = build_index([Path(corpus)], f"b{number}", home=home, tokenizer=tokenizer, embedder=embedder,
                        chunk_tokens=int(chunk_tokens), overlap_tokens=0, progress=False)
    print(json.dumps({"growth": peak() - before, "tokens": len(index.datastore), "chunks": index.num_chunks,
                      "dim": index.dense.d}))
    index.close()
"""


def peak_growths(corpora: list[Path], home: Path, tokenizer, embedder: str, chunk_tokens: int) -> list[dict]:
    """Build each corpus in turn in one fresh Python process; for each, how far the process's
    peak RSS (getrusage) rose during its build, and what it built."""
    import subprocess

    child = subprocess.run([sys.executable, "-c", _CHILD, str(home), embedder, tokenizer.name_or_path,
                            str(chunk_tokens), *map(str, corpora)], capture_output=True, text=True, timeout=600,
                           check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    return [json.loads(line) for line in child.stdout.strip().splitlines()[-len(corpora):]]


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and behaviour as on Linux")
def test_streaming_build_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer, static_embedder):
    """A corpus 4x larger raises the peak RSS above the smaller build's by at most what is
    inherently per token (the suffix array construction, 8 B/token) and per chunk (Flat keeps
    4 x dim bytes per vector, x3 while its buffer grows), plus slack. One process builds a
    warm-up corpus (lazy initialisations), the small one, then the large one.
    The in-memory build this replaced (every document, chunk text and token tuple held at once)
    fails it: +75 MiB against 40 MiB allowed; the streaming build: +10 MiB (measured here, 2 busy cores)."""
    corpora = [write_book_jsonl(tmp_path / f"{name}.jsonl", tokens)
               for name, tokens in (("warm", 20_000), ("small", SMALL_TOKENS), ("large", GROWTH * SMALL_TOKENS))]
    _, small, large = peak_growths(corpora, tmp_path / "home", tokenizer, static_embedder, CHUNK_TOKENS)
    more_tokens, more_chunks = large["tokens"] - small["tokens"], large["chunks"] - small["chunks"]
    assert more_tokens > (GROWTH - 1) * SMALL_TOKENS * 0.8, (small, large)
    allowed = SUFFIX_ARRAY_BYTES_PER_TOKEN * more_tokens + FLAT_BYTES_PER_VALUE * large["dim"] * more_chunks + SLACK_BYTES
    extra = large["growth"]  # the peak above the small build's peak
    print(f"\npeak RSS: +{small['growth'] >> 20} MiB building {small['tokens']} tokens, then +{extra >> 20} MiB "
          f"building {large['tokens']} tokens (allowed {allowed >> 20} MiB)")
    assert extra < allowed, (small, large, allowed)


def test_suffix_array_from_a_file_equals_the_one_from_the_array(tmp_path):
    import numpy as np

    tokens = np.random.default_rng(0).integers(-1, 50, size=10_000).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    assert np.array_equal(build_suffix_array(tmp_path / "tokens.npy"), build_suffix_array(tokens))


def test_on_disk_ivf_build_add_verify_and_search(tmp_path, tokenizer, static_embedder, monkeypatch):
    """IVF lists merged from several shards into dense.ivfdata; `add` writes a new version from the
    old lists and new shards, never touching the old files; rows stay chunk ids."""
    from ragspec.index import store, stream

    monkeypatch.setattr(stream, "SHARD_VECTORS", 64)  # several shards even on a small corpus
    paragraphs = [p for p in BOOK.read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:300]))
    index = build_index([docs], "od", home=tmp_path / "home", tokenizer=tokenizer, embedder=static_embedder,
                        faiss_factory="IVF16,Flat", on_disk=True, chunk_tokens=48, overlap_tokens=0, progress=False)
    assert index.manifest["dense_on_disk"] and (index.files / store.DENSE_DATA_FILE).is_file()
    assert index.dense.ntotal == index.num_chunks > 3 * 64
    assert index.build_stats.peak_rss_bytes >= index.build_stats.peak_rss_self_bytes > 0
    old_files, old_sums = index.files, dict(index.manifest["files"])
    (docs / "b.txt").write_text(paragraphs[400])
    added = add_to_index("od", [docs], home=tmp_path / "home", tokenizer=tokenizer, progress=False)
    assert added.build_stats.num_documents == 1 and added.dense.ntotal == added.num_chunks > index.num_chunks
    hit = added.search(paragraphs[400], k=1)[0]
    assert hit.source.endswith("b.txt") and hit.chunk_id >= index.num_chunks
    assert added.search(paragraphs[123], k=1)[0].source.endswith("a.jsonl#124")
    checked = verify_index("od", tmp_path / "home")  # the new files match their checksums
    assert set(checked.manifest["files"]) >= {store.DENSE_DATA_FILE, store.DENSE_TEMPLATE_FILE}
    if old_files.is_dir():  # still leased by `index`: the old version is unchanged
        assert store.file_records(old_files) == old_sums


def test_cli_build_prints_time_and_peak_memory(tmp_path, static_embedder):
    from ragspec.cli import main

    (tmp_path / "a.txt").write_text(BOOK.read_text(encoding="utf-8")[:20_000])
    result = CliRunner().invoke(main, ["index", "build", str(tmp_path / "a.txt"), "--name", "a", "--home",
                                       str(tmp_path / "home"), "--embedder", static_embedder, "--quiet"])
    assert result.exit_code == 0, result.output
    # the peak is the process's lifetime peak (a test worker may have loaded models before): MiB or GiB
    assert re.search(r"build time \d+\.\d s, peak memory \d+(\.\d+)? (MiB|GiB)", result.output), result.output
    bad = CliRunner().invoke(main, ["index", "build", str(tmp_path / "a.txt"), "--name", "b", "--home",
                                    str(tmp_path / "home"), "--embedder", static_embedder, "--on-disk", "--quiet"])
    assert bad.exit_code != 0 and "IVF" in bad.output


def test_recipe_dense_on_disk(tmp_path):
    from ragspec.errors import ConfigError
    from ragspec.index.recipe import load_recipe

    recipe = tmp_path / "big.toml"
    recipe.write_text('name = "big"\npaths = ["docs/"]\nfaiss = "IVF4096,Flat"\ndense_on_disk = true\n')
    assert load_recipe(recipe).dense_on_disk is True
    recipe.write_text('name = "big"\npaths = ["docs/"]\ndense_on_disk = "yes"\n')
    with pytest.raises(ConfigError, match="dense_on_disk must be true or false"):
        load_recipe(recipe)
