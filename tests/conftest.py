"""Shared fixtures: tiny random-weight causal LMs built in-process, and the real embedded model.

The tiny models use the embedded model's tokenizer (vocab 49152) so prompts, chat templates and
text decoding are real; their weights are random, which makes greedy output repetitive enough
that context drafts do get accepted.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

# Before anything loads: tests never read or write the user's caches. One temporary cache dir per
# test session (subprocesses and spawned workers inherit it, so the CLI tests share it); learned
# state (recycling, latency curves) starts fresh every session. Only the dequantised embedded
# model (~500 MB, ~18 s to make) is kept between sessions, in the git-ignored .cache/test-models
# of this checkout, linked into the temporary dir.
TEST_MODELS_DIR = Path(__file__).resolve().parents[1] / ".cache" / "test-models"


def _session_cache_dir() -> Path:
    inherited = os.environ.get("RAGSPEC_TEST_CACHE_DIR")
    if inherited and inherited == os.environ.get("RAGSPEC_CACHE_DIR") and Path(inherited).is_dir():
        return Path(inherited)  # a subprocess of a test session: share its cache
    cache = Path(tempfile.mkdtemp(prefix="ragspec-test-cache-"))
    TEST_MODELS_DIR.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(TEST_MODELS_DIR, target_is_directory=True)
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["RAGSPEC_CACHE_DIR"] = os.environ["RAGSPEC_TEST_CACHE_DIR"] = str(cache)
    os.environ["XDG_CACHE_HOME"] = str(cache / "xdg")  # other libraries' caches (matplotlib's fonts)
    os.environ["HF_HOME"] = str(cache / "huggingface")  # nothing is fetched: offline, empty
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


SESSION_CACHE_DIR = _session_cache_dir()

import pytest  # after the cache dir is set
import torch
from hypothesis import settings

from ragspec import Engine, LoadedModel
from ragspec.engine.budget import LatencyCurve
from ragspec.kernels.select import choose_kernels
from ragspec.models import _dequantised_dir, attention_for, embedded_model_path, load_model

# Nearly flat: verifying 64 nodes costs about what 1 costs, so the budget speculates a lot. Used
# as given (adapt=False): the budget's online latency correction would otherwise notice that
# trees cost more than that and turn speculation down (tests/test_budget.py tests that).
FLAT_CURVE = LatencyCurve(rows=(1, 64), seconds=(0.010, 0.0101), adapt=False)
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOOK = DATA_DIR / "corpus" / "pg1342_pride_and_prejudice.txt"

# mistral: every layer a 16-token sliding window; gemma3: sliding and full layers alternate.
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")
TINY_WINDOW = 16
# `make gpu-check` runs the lossless tests with RAGSPEC_TEST_DEVICE=cuda.
TEST_DEVICE = os.environ.get("RAGSPEC_TEST_DEVICE", "cpu")

# The CPUs are shared: no per-example deadline, or a busy neighbour makes hypothesis flaky.
settings.register_profile("ragspec", deadline=None)
settings.load_profile("ragspec")

# Two cores shared with other work: one thread is fastest for the tiny models (thread hand-off
# costs more than their matmuls) and, on an oversubscribed machine, ~10x faster for the real one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_dequantised_dir(embedded_model_path()))


def build_tiny_model(arch: str, vocab_size: int, *, seed: int = 0, max_positions: int = 2048):
    """A 2-layer random causal LM in float32, in eval mode, with the attention ragspec picks for
    the test device (matmul attention for short query blocks on CPU, SDPA on CUDA)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config_class, extra = {
        "llama": (LlamaConfig, {}),
        "qwen2": (Qwen2Config, {}),
        "mistral": (MistralConfig, dict(sliding_window=TINY_WINDOW)),
        "gemma3": (Gemma3TextConfig, dict(sliding_window=TINY_WINDOW, head_dim=16,
                                          layer_types=["sliding_attention", "full_attention"])),
    }[arch]
    config = config_class(**common, **extra)
    attention = attention_for(torch.device(TEST_DEVICE))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)
    return model.to(TEST_DEVICE).eval()


def tiny_loaded(arch: str, tokenizer, **kwargs) -> LoadedModel:
    """With ragspec's CPU kernels wherever they run here (packed linears, matmul attention), so
    the lossless tests run them; the plain ops they replace have tests of their own (test_kernels)."""
    loaded = LoadedModel(model=build_tiny_model(arch, len(tokenizer), **kwargs), tokenizer=tokenizer, name=f"tiny-{arch}")
    loaded.kernels = choose_kernels(loaded, mode="fast")
    return loaded


@pytest.fixture(scope="session", params=TINY_ARCHITECTURES)
def tiny_model(request, tokenizer) -> LoadedModel:
    return tiny_loaded(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LoadedModel:
    return tiny_loaded("llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model) -> Engine:
    return Engine(tiny_model, latency_curve=FLAT_CURVE)


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """The embedded model in fp32, loaded once per session (kernels chosen as for a user). Tests
    that need other engine settings wrap it: Engine(real_model, ...); none may change it."""
    return load_model(None, dtype="float32", device=TEST_DEVICE)


@pytest.fixture(scope="session")
def real_engine(real_model) -> Engine:
    return Engine(real_model)


def spec_bench_questions() -> list[dict]:
    path = DATA_DIR / "spec_bench" / "question.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def book_paragraphs(count: int) -> list[str]:
    """The first paragraphs of Pride and Prejudice (skips the test when the file is absent)."""
    if not BOOK.is_file():
        pytest.skip(f"corpus file {BOOK} not present")
    text = BOOK.read_text(encoding="utf-8")
    body = text[text.index("It is a truth universally acknowledged"):]
    return [p for p in body.split("\n\n")[:count] if p.strip()]
