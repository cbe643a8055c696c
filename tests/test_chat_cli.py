"""`ragspec chat` over several turns, on a tiny random-weight Llama saved as an HF model folder:
each printed reply equals `Engine.generate` (a cold engine, plain decoding) on the whole history
so far, the second turn reuses the first turn's KV (--stats), and --system, --stop and the
sampling flags with --seed act on every turn."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from conftest import FLAT_CURVE, build_tiny_model
from ragspec import Engine
from ragspec.cli import main

TURNS = ["Name two rivers and a sea.", "Now say it again, in French."]
MAX_NEW = 12
SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 0.95}


@pytest.fixture(autouse=True)
def flat_latency_curve(monkeypatch):
    """The CLI's engine speculates on every turn (a busy machine's measured curve can turn it
    off), so its replies are speculative ones checked against plain decoding."""
    monkeypatch.setattr("ragspec.engine.engine.load_or_measure_curve", lambda target: FLAT_CURVE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("models") / "tiny-chat"
    build_tiny_model("llama", len(tokenizer), seed=2).save_pretrained(folder)  # its turn 2 gets drafts
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir) -> Engine:
    """The same folder loaded the way the CLI loads it, with nothing cached between requests."""
    return Engine(str(model_dir), dtype="float32", device="cpu", latency_curve=FLAT_CURVE,
                  prefix_cache=False, persist_state=False)


def chat(model_dir, *args: str, turns=TURNS):
    options = ["--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", str(MAX_NEW)]
    result = CliRunner().invoke(main, ["chat", *options, *args], input="".join(f"{t}\n" for t in turns) + "\n",
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def expected_chat(engine: Engine, turns=TURNS, system: str | None = None, **options) -> list[str]:
    """Each turn's reply, generated on the history the chat should have kept."""
    history = [{"role": "system", "content": system}] if system else []
    replies = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        replies.append(engine.generate(history, max_new_tokens=MAX_NEW, speculative=False, **options).text)
        history.append({"role": "assistant", "content": replies[-1]})
    return replies


def transcript(replies: list[str]) -> str:
    """What chat prints: a prompt and the streamed reply per turn, then the prompt it ends at."""
    return "".join(f"> {reply}\n" for reply in replies) + "> "


def test_chat_keeps_the_history_and_reuses_its_kv(model_dir, reference):
    result = chat(model_dir, "--stats")
    replies = expected_chat(reference)
    assert result.stdout == transcript(replies)
    alone = reference.generate([{"role": "user", "content": TURNS[1]}], max_new_tokens=MAX_NEW, speculative=False)
    assert replies[1] != alone.text, "turn 2 without the history would read the same: the test proves nothing"
    drafted = [int(n) for n in re.findall(r"draft acceptance rate [\d.]+ \(\d+/(\d+)\)", result.stderr)]
    assert len(drafted) == 2 and sum(drafted) > 0, "chat never speculated"
    cached = [int(n) for n in re.findall(r"prompt tokens from the prefix cache: (\d+)", result.stderr)]
    assert len(cached) == 2 and cached[0] == 0
    first_prompt = len(reference.encode([{"role": "user", "content": TURNS[0]}]))
    assert cached[1] > first_prompt, f"turn 2 reused {cached[1]} tokens, turn 1's prompt alone is {first_prompt}"


def test_chat_system_message_reaches_every_turn(model_dir, reference):
    system = "You answer like a pirate."
    result = chat(model_dir, "--system", system)
    replies = expected_chat(reference, system=system)
    assert result.stdout == transcript(replies)
    assert replies != expected_chat(reference), "the system message changed nothing: the test proves nothing"


def test_chat_stop_string_cuts_each_reply_and_the_history_keeps_the_cut(model_dir, reference):
    full = expected_chat(reference)[0]
    middle = len(full) // 2
    stop = full[middle:middle + 3]
    assert stop.strip() and full.index(stop) > 0, f"no usable stop string in {full!r}"
    replies = expected_chat(reference, stop=[stop])
    assert replies[0] == full[: full.index(stop)]
    result = chat(model_dir, "--stop", stop)
    assert result.stdout == transcript(replies)


def test_chat_sampling_flags_with_a_seed_reproduce(model_dir, reference):
    flags = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95"]
    first = chat(model_dir, *flags, "--seed", "7")
    again = chat(model_dir, *flags, "--seed", "7")
    assert first.stdout == again.stdout == transcript(expected_chat(reference, **SAMPLING, seed=7))
    other = chat(model_dir, *flags, "--seed", "8")
    assert other.stdout == transcript(expected_chat(reference, **SAMPLING, seed=8))
    assert other.stdout != first.stdout
    assert first.stdout != transcript(expected_chat(reference)), "sampled like greedy: the flags were lost"
