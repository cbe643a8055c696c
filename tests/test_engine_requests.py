"""Requests through one Engine: stop strings inside speculative steps, streams advanced in turn,
threads, and streams that end early (closed, dropped, an exception)."""

from __future__ import annotations

import gc
import threading

import pytest
from conftest import FLAT_CURVE, tiny_loaded

from ragspec import Engine
from ragspec.drafting.past_responses import PastResponsesDrafter
from ragspec.errors import ConfigError

MAX_NEW = 32
PROMPTS = [
    "a b c a b c a b",
    "Hello world! Hello world! Hello",
    [{"role": "user", "content": "Say abc abc abc"}],
    [{"role": "user", "content": "Name two rivers."}],
]
CHAT = [{"role": "user", "content": "List three colours."}]


@pytest.fixture(scope="module")
def cold(tiny_llama) -> Engine:
    """The plain reference: no drafts, no prefix cache, nothing learned."""
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, prefix_cache=False, persist_state=False)


def engine_for(loaded, **options) -> Engine:
    return Engine(loaded, latency_curve=FLAT_CURVE, persist_state=False, **options)


def expected(tokenizer, reference, stops: list[str], max_new_tokens: int):
    """Plain decoding's rule written out over the no-stop reference tokens: the first token
    whose decoded text (trailing U+FFFD dropped) holds a stop string ends the request."""
    ids = reference.token_ids
    for end in range(1, min(len(ids), max_new_tokens) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True).rstrip("\ufffd")
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return ids[:end], text[: min(hits)], "stop"
    if len(ids) >= max_new_tokens:
        return ids[:max_new_tokens], tokenizer.decode(ids[:max_new_tokens], skip_special_tokens=True), "length"
    return ids, reference.text, reference.finish_reason


def stops_from(text: str) -> list[str]:
    """Stop strings taken from a plain output, at several places."""
    places = [len(text) * k // 6 for k in range(1, 6)]
    return [text[p : p + 3] for p in places if text[p : p + 3].strip()]


def test_stop_inside_a_speculative_step_gives_plain_tokens(tiny_llama, cold):
    """Issue 15 item 3: token_ids, counts and what drafters learn end with the token that
    completed the stop string, as in plain decoding, even when a step accepted tokens past it."""
    tokenizer = cold.tokenizer
    inside_a_step = 0
    for prompt in PROMPTS:
        past = PastResponsesDrafter(vocab_size=len(tokenizer))
        engine = engine_for(tiny_llama, drafter_factories=[lambda _: [past]])
        reference = cold.generate(prompt, max_new_tokens=MAX_NEW, speculative=False)
        engine.generate(prompt, max_new_tokens=MAX_NEW)  # `past` now drafts this answer whole
        for stop in stops_from(reference.text):
            ids, text, reason = expected(tokenizer, reference, [stop], MAX_NEW)
            for max_new in (MAX_NEW, len(ids), len(ids) - 1):
                if max_new < 1:
                    continue
                plain = cold.generate(prompt, max_new_tokens=max_new, stop=[stop], speculative=False)
                fast = engine.generate(prompt, max_new_tokens=max_new, stop=[stop])
                want = expected(tokenizer, reference, [stop], max_new)
                for out in (plain, fast):
                    assert (out.token_ids, out.text, out.finish_reason) == want, (prompt, stop, max_new)
                    assert out.stats.num_generated_tokens == len(want[0])
                assert list(past._responses[-1][-len(fast.token_ids):]) == fast.token_ids
                committed = fast.stats.num_accepted_tokens + fast.stats.num_steps
                inside_a_step += fast.finish_reason == "stop" and committed > len(fast.token_ids)
    assert inside_a_step >= 5  # stops really ended inside multi-token steps


@pytest.mark.slow
def test_real_model_stop_strings_speculative_equals_plain(real_engine):
    """Over real-model identity prompts (fp32), with stop strings from each plain answer:
    speculative == plain == the token-by-token rule, in every field a user sees."""
    from test_lossless import real_prompts

    prompts = real_prompts()[::3]  # a third of them, across the categories (minutes on 2 CPUs)
    if not prompts:
        pytest.skip("spec_bench data not found under ../shared/data")
    cold = Engine(real_engine.target, latency_curve=FLAT_CURVE, prefix_cache=False, persist_state=False)
    inside_a_step = 0
    for question_id, messages in prompts:
        reference = cold.generate(messages, max_new_tokens=MAX_NEW, speculative=False)
        real_engine.generate(messages, max_new_tokens=MAX_NEW)  # the past drafter learns the answer
        for stop in stops_from(reference.text)[1::2]:
            want = expected(real_engine.tokenizer, reference, [stop], MAX_NEW)
            plain = cold.generate(messages, max_new_tokens=MAX_NEW, stop=[stop], speculative=False)
            fast = real_engine.generate(messages, max_new_tokens=MAX_NEW, stop=[stop])
            for out in (plain, fast):
                assert (out.token_ids, out.text, out.finish_reason) == want, (question_id, stop)
                assert out.stats.num_generated_tokens == len(want[0])
            inside_a_step += fast.stats.num_accepted_tokens + fast.stats.num_steps > len(fast.token_ids)
    assert inside_a_step >= len(prompts) // 2


def test_stop_string_and_eos_in_one_step(tokenizer):
    """EOS before the stop string's end wins; a stop string that completes before EOS wins."""
    loaded = tiny_loaded("llama", tokenizer)  # own copy: its EOS id is changed below
    prompt = PROMPTS[1]
    reference = engine_for(loaded, prefix_cache=False).generate(prompt, max_new_tokens=MAX_NEW, speculative=False)
    eos = reference.token_ids[20]
    loaded.model.generation_config.eos_token_id = eos
    cold = engine_for(loaded, prefix_cache=False)
    reference = cold.generate(prompt, max_new_tokens=MAX_NEW, speculative=False)
    assert reference.finish_reason == "eos" and len(reference.token_ids) <= 20
    end = len(tokenizer.decode(reference.token_ids, skip_special_tokens=True))
    early = len(tokenizer.decode(reference.token_ids[:-3], skip_special_tokens=True))  # 3 tokens before EOS
    text = tokenizer.decode(reference.token_ids + [eos] + reference.token_ids, skip_special_tokens=True)
    past = PastResponsesDrafter(vocab_size=len(tokenizer))
    past.remember(cold.encode(prompt)[-8:] + reference.token_ids + [eos] + reference.token_ids)
    engine = engine_for(loaded, drafter_factories=[lambda _: [past]])
    for stop in (text[early - 3 : early], text[end - 2 : end + 2]):  # ends before EOS / would end after
        plain = cold.generate(prompt, max_new_tokens=MAX_NEW, stop=[stop], speculative=False)
        fast = engine.generate(prompt, max_new_tokens=MAX_NEW, stop=[stop])
        want = expected(tokenizer, reference, [stop], MAX_NEW)
        assert (plain.token_ids, plain.text, plain.finish_reason) == want
        assert (fast.token_ids, fast.text, fast.finish_reason) == want
        committed = fast.stats.num_accepted_tokens + fast.stats.num_steps
        assert committed > len(fast.token_ids) + (fast.finish_reason == "eos")  # the step ran past its end


def test_stop_given_as_one_string(tiny_llama, cold):
    """Issue 15 item 6: stop="xyz" is one stop string, not the letters x, y and z."""
    reference = cold.generate(PROMPTS[2], max_new_tokens=MAX_NEW, speculative=False)
    word = next(w for w in reference.text.split() if len(w) >= 4 and reference.text.find(w[0]) < reference.text.find(w))
    one = cold.generate(PROMPTS[2], max_new_tokens=MAX_NEW, stop=word, speculative=False)
    assert one.text == reference.text[: reference.text.find(word)] and one.finish_reason == "stop"
    assert cold.generate(PROMPTS[2], max_new_tokens=MAX_NEW, stop=[word], speculative=False).text == one.text
    with pytest.raises(ConfigError, match="stop"):
        cold.stream(PROMPTS[2], stop=[word, 3])


# -- several requests on one engine ----------------------------------------------------------


def test_two_streams_advanced_in_turn_each_equal_their_solo_output(tiny_llama, cold):
    engine = engine_for(tiny_llama)
    solo = [cold.generate(p, max_new_tokens=MAX_NEW, speculative=False) for p in PROMPTS[2:]]
    streams = [engine.stream(p, max_new_tokens=MAX_NEW) for p in PROMPTS[2:]]
    pieces: list[list[str]] = [[], []]
    live = [iter(s) for s in streams]
    while any(live):
        for i, it in enumerate(live):
            if it is not None:
                piece = next(it, None)
                if piece is None:
                    live[i] = None
                else:
                    pieces[i].append(piece)
    for stream, shown, reference in zip(streams, pieces, solo):
        assert len(shown) > 2  # they really were interleaved
        assert stream.result.token_ids == reference.token_ids and "".join(shown) == reference.text


def test_threads_on_one_engine_each_equal_their_solo_output(tiny_llama, cold):
    engine = engine_for(tiny_llama)
    solo = [cold.generate(p, max_new_tokens=MAX_NEW, speculative=False) for p in PROMPTS[:3]]
    results, errors = [None] * 3, []

    def run(i: int) -> None:
        try:
            for _ in range(2):  # the second round drafts from what the first one learned
                results[i] = engine.generate(PROMPTS[i], max_new_tokens=MAX_NEW)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and all(not t.is_alive() for t in threads)
    assert [r.token_ids for r in results] == [r.token_ids for r in solo]
    assert sum(r.stats.num_accepted_tokens for r in results) > 0


# -- streams that end early (issue 13 item 1) ------------------------------------------------


def follow_up(engine: Engine) -> list[dict]:
    """The conversation's second turn, after its first was answered through `engine`."""
    answer = engine.generate(CHAT, max_new_tokens=MAX_NEW)
    return [*CHAT, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "Again."}]


def abandon_by_close(stream):
    next(iter(stream))
    stream.close()


def abandon_by_with(stream):
    with stream:
        next(iter(stream))


@pytest.mark.parametrize("abandon", [abandon_by_close, abandon_by_with])
def test_abandoned_stream_returns_its_prefix_and_teaches_drafters(tiny_llama, cold, abandon):
    past = PastResponsesDrafter(vocab_size=len(cold.tokenizer))
    engine = engine_for(tiny_llama, drafter_factories=[lambda _: [past]])
    messages = follow_up(engine)
    learned = past.num_responses
    stream = engine.stream(messages, max_new_tokens=MAX_NEW)
    abandon(stream)
    result = stream.result
    assert result is not None and result.finish_reason == "cancelled"
    assert 0 < len(result.token_ids) < MAX_NEW
    assert past.num_responses == learned + 1
    assert list(past._responses[-1][-len(result.token_ids):]) == result.token_ids
    again = engine.generate(messages, max_new_tokens=MAX_NEW)
    assert again.stats.cached_prompt_tokens > len(engine.encode(CHAT))  # the first turn's KV was back
    assert again.token_ids == cold.generate(messages, max_new_tokens=MAX_NEW, speculative=False).token_ids


def test_dropped_stream_ends_its_request_at_once(tiny_llama, cold):
    """Dropping a half-read stream (no close, no garbage collector) hands its prefix back."""
    engine = engine_for(tiny_llama)
    messages = follow_up(engine)
    gc.disable()
    try:
        stream = engine.stream(messages, max_new_tokens=MAX_NEW)
        next(iter(stream))
        del stream
        again = engine.generate(messages, max_new_tokens=MAX_NEW)
    finally:
        gc.enable()
    assert again.stats.cached_prompt_tokens > len(engine.encode(CHAT))
    assert again.token_ids == cold.generate(messages, max_new_tokens=MAX_NEW, speculative=False).token_ids


def test_stream_closed_before_it_starts(tiny_llama):
    engine = engine_for(tiny_llama)
    stream = engine.stream(CHAT, max_new_tokens=MAX_NEW)
    stream.close()
    assert stream.result.finish_reason == "cancelled" and stream.result.token_ids == []
    assert list(stream) == []


class FailingDrafter:
    """A drafter whose proposal number `fail_at` raises, as a broken drafter or an interrupted
    step would."""

    name = "failing"

    def __init__(self):
        self.calls, self.finished, self.fail_at = 0, 0, None

    def propose(self, context):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("drafter broke")
        from ragspec.types import DraftTree

        return DraftTree.empty()

    def observe(self, step) -> None:
        pass

    def finish_request(self, prompt_ids, generated_ids) -> None:
        self.finished += 1


def test_exception_inside_a_step_ends_the_request_cleanly(tiny_llama, cold):
    failing = FailingDrafter()
    engine = engine_for(tiny_llama, drafter_factories=[lambda _: [failing]])
    messages = follow_up(engine)
    failing.fail_at = failing.calls + 2  # the second step of the next request
    stream = engine.stream(messages, max_new_tokens=MAX_NEW)
    with pytest.raises(RuntimeError, match="drafter broke"):
        for _ in stream:
            pass
    assert stream.result.finish_reason == "error"
    assert failing.finished == 1  # the first turn only: a failed request teaches nothing
    again = engine.generate(messages, max_new_tokens=MAX_NEW)  # the half-used cache was dropped
    assert again.stats.cached_prompt_tokens == 0 and again.finish_reason in ("eos", "length")
    assert again.token_ids == cold.generate(messages, max_new_tokens=MAX_NEW, speculative=False).token_ids
