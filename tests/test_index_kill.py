"""Index builds under SIGKILL and under concurrent readers (issue 15 items 8 and the kill test).

Children are forked from the test process once the tokenizer and embedder are loaded, so each
starts building at once; FAISS runs single-threaded in them (OpenMP after fork).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from conftest import book_paragraphs
from ragspec.index import build_index_from_texts, open_index, verify_index, versions

KILLS = 20
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and flock (POSIX)")


@pytest.fixture(scope="module")
def texts():
    return [(f"p{i}", p) for i, p in enumerate(book_paragraphs(8))]


def build(home: Path, texts, tokenizer, size: int):
    index, _ = build_index_from_texts(texts[:size], "kill", home, tokenizer=tokenizer, chunk_tokens=32,
                                      overlap_tokens=4)
    return index


def fork(work) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            import faiss

            faiss.omp_set_num_threads(1)
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_sigkill_during_builds_leaves_the_last_complete_index(tmp_path, texts, tokenizer):
    home, log = tmp_path / "home", tmp_path / "built.log"
    sizes = (2, 3, 4)
    build(home, texts, tokenizer, sizes[0]).close()  # warms the embedder in this process too
    rng = random.Random(15)

    def builder():
        for round_ in range(10_000):
            index = build(home, texts, tokenizer, sizes[round_ % len(sizes)])
            with open(log, "a") as out:
                out.write(json.dumps([index.files.name, index.num_documents]) + "\n")
            index.close()

    verified = []
    for _ in range(KILLS):
        pid = fork(builder)
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        index = verify_index("kill", home)  # the last complete index opens and verifies
        assert index.num_documents in sizes
        verified.append(index.files.name)
        index.close()
    logged = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert logged, "no build finished between kills: the children made no progress"
    final = build(home, texts, tokenizer, 4)  # the next build succeeds, and cleans up after the dead ones
    assert verify_index("kill", home).num_documents == 4
    leftovers = sorted(p.name for p in (home / "kill").iterdir() if p.name not in (".lock", "CURRENT"))
    assert leftovers == [final.files.name], leftovers
    print(f"\nkill test: {KILLS} SIGKILLs, {len(logged)} builds completed in between, "
          f"{len(set(verified))} distinct versions verified after kills, 0 lost")


def test_readers_hammering_open_while_builds_run(tmp_path, texts, tokenizer):
    """Item 8: a reader process opens (with every checksum) in a loop while this process rebuilds:
    every open sees a whole index, old or new, and every build succeeds."""
    home, report = tmp_path / "home", tmp_path / "reader.json"
    build(home, texts, tokenizer, 2).close()
    stop = tmp_path / "stop"

    def reader():
        opened, failures = 0, []
        while not stop.exists():
            try:
                index = verify_index("kill", home)
                assert index.num_documents in (2, 3) and index.dense.ntotal == index.num_chunks
                index.close()
                opened += 1
            except Exception as exc:  # recorded for the parent to report
                failures.append(f"{type(exc).__name__}: {exc}")
        report.write_text(json.dumps({"opened": opened, "failures": failures[:5], "failed": len(failures)}))

    pid = fork(reader)
    builds = 0
    try:
        for round_ in range(8):
            build(home, texts, tokenizer, 3 if round_ % 2 == 0 else 2).close()
            builds += 1
    finally:
        stop.touch()
        os.waitpid(pid, 0)
    result = json.loads(report.read_text())
    assert builds == 8 and result["failed"] == 0, result
    assert result["opened"] > 0
    assert open_index("kill", home).num_documents == 2
    build(home, texts, tokenizer, 3).close()  # versions the reader still held are collected now
    assert [p.name for p in (home / "kill").iterdir() if p.is_dir()] == [versions.current(home / "kill").name]
    print(f"\nreader: {result['opened']} whole opens during {builds} builds, 0 failures")
