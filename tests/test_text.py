"""Incremental detokenisation: stop strings across token boundaries, held-back text, UTF-8."""

from __future__ import annotations

import pytest

from ragspec.engine.text import TextAssembler


def push_one_by_one(assembler: TextAssembler, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        pieces.append(assembler.push([token]))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return pieces


def test_stop_string_split_over_tokens(tokenizer):
    ids = tokenizer("Hello world. The end is near.").input_ids
    stop = "ld. Th"
    # the stop string really does straddle token boundaries
    assert not any(stop in tokenizer.decode([t]) for t in ids)
    assembler = TextAssembler(tokenizer, [stop])
    shown = ""
    for token in ids:
        shown += assembler.push([token])
        assert "Hello world"[: len(shown)] == shown[:11], "text past the stop string was shown"
        if assembler.stopped:
            break
    shown += assembler.finish()
    assert assembler.stopped
    assert assembler.text == shown == "Hello wor"


def test_stop_string_inside_one_multi_token_push(tokenizer):
    ids = tokenizer("one two three four five").input_ids
    assembler = TextAssembler(tokenizer, ["three"])
    assert assembler.push(ids) == "one two "
    assert assembler.stopped and assembler.text == "one two "
    assert assembler.finish() == ""


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer("alpha STOP beta END gamma").input_ids
    assembler = TextAssembler(tokenizer, ["END", "STOP", ""])
    text = "".join(push_one_by_one(assembler, ids))
    assert text == assembler.text == "alpha "


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    ids = tokenizer("abc xy").input_ids
    assembler = TextAssembler(tokenizer, ["xyz"])
    shown = "".join(assembler.push([t]) for t in ids)
    assert shown == "abc " and not assembler.stopped  # "xy" might still become "xyz"
    assert assembler.finish() == "xy"
    assert assembler.text == "abc xy"


def test_held_back_prefix_that_does_not_complete_is_emitted(tokenizer):
    ids = tokenizer("abc xy and more").input_ids
    pieces = push_one_by_one(TextAssembler(tokenizer, ["xyz"]), ids)
    assert "".join(pieces) == "abc xy and more"


@pytest.mark.parametrize("text", ["I like 😀 and 日本語 and 𝔘𝔫𝔦", "naïve café — “quotes” 🎉🎉"])
def test_incomplete_utf8_is_never_emitted(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    assembler = TextAssembler(tokenizer)
    pieces = push_one_by_one(assembler, ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_no_stop_strings_streams_everything(tokenizer):
    ids = tokenizer("plain text, nothing held").input_ids
    pieces = push_one_by_one(TextAssembler(tokenizer), ids)
    assert "".join(pieces[:-1]) == "plain text, nothing held" and pieces[-1] == ""


# -- finish reasons through the Engine ------------------------------------------------------

PROMPT = [{"role": "user", "content": "Say abc abc abc"}]


@pytest.mark.parametrize("speculative", [False, True])
def test_finish_reason_length(tiny_engine, speculative):
    out = tiny_engine.generate(PROMPT, max_new_tokens=7, speculative=speculative)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 7
    assert out.stats.num_generated_tokens == 7


@pytest.mark.parametrize("speculative", [False, True])
def test_finish_reason_stop_and_streaming(tiny_engine, speculative):
    reference = tiny_engine.generate(PROMPT, max_new_tokens=30, speculative=False)
    full = reference.text
    boundary = len(tiny_engine.tokenizer.decode(reference.token_ids[:12], skip_special_tokens=True))
    stop = full[boundary - 2 : boundary + 2]
    assert len(stop) == 4
    stream = tiny_engine.stream(PROMPT, max_new_tokens=30, stop=[stop], speculative=speculative)
    pieces = list(stream)
    out = stream.result
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]
    assert "".join(pieces) == out.text
    assert stop not in "".join(pieces)


@pytest.mark.parametrize("speculative", [False, True])
def test_finish_reason_eos(tokenizer, speculative):
    from conftest import FLAT_CURVE, tiny_loaded
    from ragspec import Engine

    loaded = tiny_loaded("llama", tokenizer)  # own copy: its EOS id is changed below
    reference = Engine(loaded, latency_curve=FLAT_CURVE).generate(PROMPT, max_new_tokens=30, speculative=False)
    eos = reference.token_ids[10]
    loaded.model.generation_config.eos_token_id = eos
    assert loaded.eos_token_ids == {eos}
    cut = reference.token_ids.index(eos)
    out = Engine(loaded, latency_curve=FLAT_CURVE).generate(PROMPT, max_new_tokens=30, speculative=speculative)
    assert out.finish_reason == "eos"
    assert out.token_ids == reference.token_ids[:cut]  # EOS itself excluded
    assert out.stats.num_generated_tokens == cut
