"""Learned state on disk (recycling matrix, past responses, latency curves): bad files are ignored
with a warning, saves never fail a request nor leave a broken file (also with concurrent writers
and SIGKILLed savers), tests run in a temporary cache dir, and the recycling file is keyed by the
model's identity."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import (
    FLAT_CURVE,
    SESSION_CACHE_DIR,
    TEST_MODELS_DIR,
    book_paragraphs,
    tiny_loaded,
)

from ragspec import Engine, load_model
from ragspec.config import SpecConfig
from ragspec.drafting.base import load_state, remove_stale_temporaries, save_state
from ragspec.drafting.past_responses import PastResponsesDrafter
from ragspec.drafting.recycling import TOP_K, UNKNOWN, TokenRecyclingDrafter
from ragspec.engine.budget import (
    LatencyCurve,
    load_or_measure_curve,
    read_curve,
    save_curve,
)
from ragspec.index import build_index_from_texts
from ragspec.index.store import PAST_RESPONSES_FILE
from ragspec.models import cache_dir, files_identity

PROMPT = "Tell me about the weather in the mountains."
INDEX = "state"
FAST_ROWS = (1, 2, 4)  # a latency curve measured in well under a second on the tiny model


def _recycling_files(cache: Path) -> list[Path]:
    return sorted((cache / "recycling").glob("*.npy"))


def _warnings(caplog) -> list[str]:
    """Warnings from where learned state is read and written."""
    records = caplog.records
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING and r.name.startswith(("ragspec.drafting", "ragspec.engine.budget"))]


def _save_raw(path: Path, content: bytes | np.ndarray) -> None:
    """Write one kind of bad learned-state file at `path`."""
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    else:
        path.write_bytes(content)


def _bad_recycling_files(vocab: int) -> dict[str, bytes | np.ndarray]:
    good = np.zeros((vocab, TOP_K), dtype=np.int32)
    with tempfile.TemporaryFile() as file:
        np.save(file, good)
        file.seek(0)
        whole = file.read()
    return {
        "empty": b"",
        "truncated": whole[: len(whole) // 2],
        "garbage": bytes(range(256)) * 16,
        "pickled": np.array([{"a": 1}], dtype=object),
        "wrong shape": np.zeros((vocab, TOP_K + 1), dtype=np.int32),
        "float dtype": np.full((vocab, TOP_K), 0.5),
        "ids past the vocabulary": np.full((vocab, TOP_K), vocab + 7, dtype=np.int32),
        "ids below UNKNOWN": np.full((vocab, TOP_K), -5, dtype=np.int32),
    }


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAGSPEC_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def index_home(tmp_path_factory, tokenizer) -> Path:
    home = tmp_path_factory.mktemp("state-index")
    texts = [(f"p{i}", p) for i, p in enumerate(book_paragraphs(12))]
    build_index_from_texts(texts, INDEX, home=home, tokenizer=tokenizer, chunk_tokens=64, overlap_tokens=8)
    return home


# --- item 1: unreadable learned state is a warning and a fresh start, never a failed request ---


@pytest.mark.parametrize("kind", list(_bad_recycling_files(8)))
def test_a_bad_recycling_file_is_ignored_with_a_warning(tiny_llama, private_cache, caplog, kind):
    vocab = int(tiny_llama.model.config.vocab_size)
    plain = Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False).generate(
        PROMPT, max_new_tokens=12, speculative=False)
    Engine(tiny_llama, latency_curve=FLAT_CURVE).generate(PROMPT, max_new_tokens=4)
    [state] = _recycling_files(private_cache)
    _save_raw(state, _bad_recycling_files(vocab)[kind])
    result = Engine(tiny_llama, latency_curve=FLAT_CURVE).generate(PROMPT, max_new_tokens=12)
    assert result.token_ids == plain.token_ids
    assert any("recycling" in m or str(state) in m for m in _warnings(caplog)), _warnings(caplog)
    repaired = np.load(state)  # the request's save replaced the bad file with a valid one
    assert repaired.shape == (vocab, TOP_K) and repaired.dtype == np.int32
    assert repaired.min() >= UNKNOWN and repaired.max() < vocab and (repaired != UNKNOWN).any()


@pytest.mark.parametrize("kind", ["empty", "garbage", "pickled", "2-D", "ids past the vocabulary"])
def test_a_bad_past_responses_file_is_ignored_with_a_warning(tiny_llama, index_home, tmp_path, caplog, kind):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(index_home, home)
    state = home / INDEX / PAST_RESPONSES_FILE
    vocab = int(tiny_llama.model.config.vocab_size)
    content = {"empty": b"", "garbage": bytes(range(256)) * 12, "pickled": np.array([[1, 2]], dtype=object),
               "2-D": np.zeros((3, 4), dtype=np.int32),
               "ids past the vocabulary": np.array([-1, 5, vocab + 1], dtype=np.int32)}[kind]
    _save_raw(state, content)
    spec = SpecConfig(drafters=("past", "context"))
    engine = Engine(tiny_llama, latency_curve=FLAT_CURVE, index_home=home, spec=spec)
    result = engine.generate(PROMPT, index=INDEX, max_new_tokens=12)
    plain = Engine(tiny_llama, latency_curve=FLAT_CURVE, index_home=home, persist_state=False).generate(
        PROMPT, index=INDEX, max_new_tokens=12, speculative=False)
    assert result.token_ids == plain.token_ids
    assert any(str(state) in m for m in _warnings(caplog)), _warnings(caplog)
    assert PastResponsesDrafter(state_path=state, vocab_size=vocab).num_responses == 1  # repaired by the save


@pytest.mark.parametrize("content", [b"", b"\xff\xfe not json", b"[1, 2]", b'{"rows": [], "seconds": []}',
                                     b'{"rows": [1, 2], "seconds": [0.1]}', b'{"rows": [2, 1], "seconds": [1, 1]}',
                                     b'{"rows": [1, 2], "seconds": [NaN, 1]}', b'{"rows": [1], "seconds": [-1]}'])
def test_a_bad_latency_cache_is_measured_again(tiny_llama, private_cache, caplog, content):
    path = private_cache / "latency" / f"{tiny_llama.fingerprint}.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    curve = load_or_measure_curve(tiny_llama, rows=FAST_ROWS)
    assert curve.rows == FAST_ROWS and all(np.isfinite(curve(np.arange(1, 6)))) and min(curve.seconds) > 0
    assert any(str(path) in m for m in _warnings(caplog)), _warnings(caplog)
    assert read_curve(path) == curve  # the new measurement replaced the bad file


def test_the_cli_still_answers_over_an_empty_recycling_file(tokenizer, tmp_path, private_cache):
    """The issue's symptom: every `ragspec generate` exited 1 printing only `Aborted!`."""
    from click.testing import CliRunner
    from conftest import build_tiny_model

    from ragspec.cli import main

    folder = tmp_path / "tiny"
    build_tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    fingerprint = load_model(folder, device="cpu", dtype="float32").fingerprint
    save_curve(private_cache / "latency" / f"{fingerprint}.json", FLAT_CURVE)  # skips profiling
    args = ["generate", PROMPT, "--model", str(folder), "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    [state] = _recycling_files(private_cache)
    state.write_bytes(b"")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout and again.stdout.strip()


# --- item 2: saving is safe with concurrent writers, and a failed save never fails a request ---


def test_concurrent_saves_never_fail_and_readers_never_see_a_broken_file(tmp_path):
    path = tmp_path / "state.npy"
    shape, writers, saves = (20_000,), 4, 50
    failures: list[object] = []
    seen: list[int] = []
    done = threading.Event()

    def write(worker: int) -> None:
        for i in range(saves):
            try:
                if not save_state(path, np.full(shape, worker * 1000 + i, dtype=np.int32)):
                    failures.append((worker, i, "save returned False"))
            except Exception as exc:  # the old fixed temporary name: FileNotFoundError
                failures.append((worker, i, repr(exc)))

    def read() -> None:
        while not done.is_set():
            if path.is_file():
                array = load_state(path, "test state")
                if array is None or array.shape != shape or len(np.unique(array)) != 1:
                    failures.append(("reader", None if array is None else array.shape))
                else:
                    seen.append(int(array[0]))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    reader = threading.Thread(target=read)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    assert not failures, failures[:5]
    final = np.load(path)
    assert final[0] % 1000 == saves - 1  # whole: the last save of one writer (last writer wins)
    assert seen, "the reader never read"
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


def test_an_unwritable_cache_dir_never_fails_a_request_and_warns_once(tiny_llama, private_cache, caplog):
    private_cache.mkdir()
    (private_cache / "recycling").write_text("a file where the state dir should be")
    engine = Engine(tiny_llama, latency_curve=FLAT_CURVE)
    first = engine.generate(PROMPT, max_new_tokens=8)
    second = engine.generate(PROMPT, max_new_tokens=8)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 8
    assert len([m for m in _warnings(caplog) if "cannot save" in m]) == 1, _warnings(caplog)


def test_an_unwritable_latency_cache_still_measures(tiny_llama, private_cache, caplog):
    private_cache.mkdir()
    (private_cache / "latency").write_text("a file where the latency dir should be")
    curve = load_or_measure_curve(tiny_llama, rows=FAST_ROWS)
    assert curve.rows == FAST_ROWS
    assert any("cannot save the latency curve" in m for m in _warnings(caplog)), _warnings(caplog)


def test_a_failed_save_leaves_no_temporary_file(tmp_path, caplog):
    for name in ("state.npy", "curve.json"):
        (tmp_path / name).mkdir()  # os.replace onto a directory fails after the temporary file was written
    assert save_state(tmp_path / "state.npy", np.arange(10)) is False
    assert save_curve(tmp_path / "curve.json", LatencyCurve((1, 2), (0.1, 0.2))) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.json", "state.npy"]
    assert len(_warnings(caplog)) == 2


def test_a_save_keeps_the_files_permissions(tmp_path):
    path = tmp_path / "state.npy"
    save_state(path, np.arange(4))
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, like the index beside it
    path.chmod(0o640)
    save_state(path, np.arange(5))
    assert path.stat().st_mode & 0o777 == 0o640 and len(np.load(path)) == 5


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    path = tmp_path / "state.npy"
    save_state(path, np.arange(4))
    stale, fresh = tmp_path / ".state.npy.abc.tmp", tmp_path / ".state.npy.def.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in flight")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temporaries(path) == 1
    assert fresh.exists() and not stale.exists() and path.exists()


# --- item 7: tests run in a temporary cache dir; the recycling file is keyed by model identity ---


def test_tests_run_with_a_temporary_cache_dir():
    assert cache_dir() == SESSION_CACHE_DIR
    assert Path(tempfile.gettempdir()) in SESSION_CACHE_DIR.parents
    assert not str(SESSION_CACHE_DIR).startswith(str(Path.home() / ".cache"))
    assert (SESSION_CACHE_DIR / "models").resolve() == TEST_MODELS_DIR.resolve()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HOME"].startswith(str(SESSION_CACHE_DIR))
    assert os.environ["XDG_CACHE_HOME"].startswith(str(SESSION_CACHE_DIR))


def test_recycling_state_is_keyed_by_the_models_weights(tokenizer, private_cache):
    """In-process models named alike (tiny-llama) but with other weights learn separately; the
    same weights built again reuse the state."""
    for seed in (0, 1, 0):
        model = tiny_loaded("llama", tokenizer, seed=seed)
        Engine(model, latency_curve=FLAT_CURVE).generate(PROMPT, max_new_tokens=4)
    assert len(_recycling_files(private_cache)) == 2


def test_recycling_state_is_keyed_by_the_models_files(tokenizer, tmp_path, private_cache):
    """Two model folders with the same basename in different places get their own state."""
    from conftest import build_tiny_model

    folders = [tmp_path / "a" / "model", tmp_path / "b" / "model"]
    for folder in folders:
        build_tiny_model("llama", len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    loaded = [load_model(folder, device="cpu", dtype="float32") for folder in folders]
    assert loaded[0].identity != loaded[1].identity
    assert loaded[0].identity == files_identity(tmp_path / "b" / ".." / "a" / "model"), "stable, by resolved path"
    for model in loaded:
        Engine(model, latency_curve=FLAT_CURVE).generate(PROMPT, max_new_tokens=4)
    assert len(_recycling_files(private_cache)) == 2


# --- concurrency: several processes generating and saving through one cache dir and one index ---

WRITERS, REQUESTS = 4, 50
QUESTIONS = ["Who rents Netherfield Park?", "What does Mrs. Bennet want?", PROMPT, "Name the Bennet daughters."]


def run_writer(cache: str, home: str, tokenizer_dir: str, requests: int) -> dict:
    """One writer process: `requests` requests (RAG ones through the shared index, plain ones),
    with a new Engine every 10 requests that loads again what the others saved (the latency curve
    through the same cache as an Engine's, with fewer row counts so that measuring is quick)."""
    from transformers import AutoTokenizer

    os.environ["RAGSPEC_CACHE_DIR"] = cache
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ragspec.drafting").addHandler(handler)  # where learned state is read and written
    model = tiny_loaded("llama", AutoTokenizer.from_pretrained(tokenizer_dir))
    errors: list[str] = []
    for i in range(requests):
        if i % 10 == 0:
            engine = Engine(model, index_home=home, latency_curve=load_or_measure_curve(model, rows=FAST_ROWS))
        try:
            engine.generate(QUESTIONS[i % len(QUESTIONS)], index=INDEX if i % 2 else None, k=1, max_new_tokens=8)
        except Exception as exc:  # noqa: BLE001 - counted, the test asserts there are none
            errors.append(repr(exc))
    return {"requests": requests, "errors": errors, "warnings": warnings}


def _check_state_files(cache: Path, home: Path, vocab: int) -> None:
    """Every learned-state file loads whole and non-empty, and no temporary file is left."""
    [recycling] = _recycling_files(cache)
    assert (TokenRecyclingDrafter(vocab, recycling).successors != UNKNOWN).any()
    assert PastResponsesDrafter(state_path=home / INDEX / PAST_RESPONSES_FILE, vocab_size=vocab).num_responses > 0
    [latency] = (cache / "latency").glob("*.json")
    assert read_curve(latency) is not None
    assert not [p for folder in (cache / "recycling", cache / "latency", home / INDEX) for p in folder.glob("*.tmp")]


def test_concurrent_writers_lose_no_request_and_leave_loadable_state(tiny_llama, index_home, tmp_path, caplog):
    import shutil

    from ragspec.models import _dequantised_dir, embedded_model_path

    cache, home = tmp_path / "cache", tmp_path / "home"
    shutil.copytree(index_home, home)
    call = (f"import json, test_state; print(json.dumps(test_state.run_writer("
            f"{str(cache)!r}, {str(home)!r}, {str(_dequantised_dir(embedded_model_path()))!r}, {REQUESTS})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    writers = [subprocess.Popen([sys.executable, "-c", call], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(WRITERS)]
    reports = [json.loads(w.communicate(timeout=300)[0].splitlines()[-1]) for w in writers]
    assert [w.returncode for w in writers] == [0] * WRITERS
    assert sum(r["requests"] for r in reports) == WRITERS * REQUESTS
    assert [r["errors"] for r in reports] == [[]] * WRITERS, "zero failed requests"
    assert [r["warnings"] for r in reports] == [[]] * WRITERS, "no writer ever read a broken file"
    _check_state_files(cache, home, int(tiny_llama.model.config.vocab_size))
    assert not _warnings(caplog)


# --- kills: a process SIGKILLed while saving leaves state that the next start loads ---

KILLS = 20
KILL_VOCAB = 49152  # the real tokenizer's: a 1.5 MB recycling matrix per save


def save_forever(directory: str, ready: Callable[[], None]) -> None:
    """Save recycling, past-responses and latency state in a loop, each save numbered one more
    than the last one this process found on disk, until killed; `ready()` after the first round."""
    folder = Path(directory)
    recycling = TokenRecyclingDrafter(KILL_VOCAB, folder / "recycling.npy")
    past = PastResponsesDrafter(state_path=folder / PAST_RESPONSES_FILE, vocab_size=KILL_VOCAB)
    first = step = int(recycling.successors[0, 0]) + 1
    while True:
        recycling.successors[:] = step
        recycling.finish_request([], [])
        past.finish_request([step], list(range(step, step + 20)))
        save_curve(folder / "latency.json", LatencyCurve((1, 2), (step + 1.0, step + 2.0)))
        if step == first:
            ready()
        step += 1


def serve_kills(directory: str) -> None:
    """The killer process: per line `<delay>` on stdin, fork a saver, wait for its first round,
    let it save for `delay` seconds, SIGKILL it and print its wait status. Forking from here
    (single-threaded, everything imported once) makes a saver start in milliseconds."""
    import signal

    for line in sys.stdin:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            try:
                save_forever(directory, lambda: os.write(ready_w, b"."))
            finally:
                os._exit(1)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        time.sleep(float(line))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)


def _load_after_kill(folder: Path) -> tuple[int, int, float]:
    """What the next start loads: (recycling step, stored responses, latency step), each checked whole."""
    matrix = TokenRecyclingDrafter(KILL_VOCAB, folder / "recycling.npy").successors
    assert len(np.unique(matrix)) == 1 and matrix[0, 0] != UNKNOWN, "one whole save"
    past = PastResponsesDrafter(state_path=folder / PAST_RESPONSES_FILE, vocab_size=KILL_VOCAB)
    for response in past._responses:
        assert list(response) == [response[0], *range(response[0], response[0] + 20)], "whole responses"
    curve = read_curve(folder / "latency.json")
    assert curve is not None and curve.seconds[1] == curve.seconds[0] + 1
    return int(matrix[0, 0]), past.num_responses, curve.seconds[0]


def test_sigkill_while_saving_never_breaks_the_next_start(tmp_path, caplog):
    import signal

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    killer = subprocess.Popen([sys.executable, "-c", f"import test_state; test_state.serve_kills({str(tmp_path)!r})"],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rng, loaded, orphans = random.Random(15), [(0, 0, 0.0)], 0
    try:
        for _ in range(KILLS):
            killer.stdin.write(f"{rng.uniform(0.0, 0.03)}\n")
            killer.stdin.flush()
            assert killer.stdout.readline().strip() == str(int(signal.SIGKILL))
            orphans = len(list(tmp_path.glob(".*.tmp")))
            loaded.append(_load_after_kill(tmp_path))  # the next start
            previous, now = loaded[-2], loaded[-1]
            assert all(n > p for n, p in zip(now, previous)), f"state went back: {previous} -> {now}"
    finally:
        killer.stdin.close()
        killer.wait(timeout=60)
    assert not _warnings(caplog), "no start ever found a broken file"
    removed = sum(remove_stale_temporaries(tmp_path / name, older_than_s=0)
                  for name in ("recycling.npy", PAST_RESPONSES_FILE, "latency.json"))
    assert removed == orphans and not list(tmp_path.glob(".*.tmp"))
    print(f"{KILLS} SIGKILLs, {orphans} temporaries of interrupted saves, steps reached {loaded[-1]}")
