"""Incremental detokenisation: stop strings across token boundaries, held-back text, UTF-8."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers.pre_tokenizers import ByteLevel

from ragspec.engine.text import TextAssembler
from ragspec.errors import ConfigError


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


# -- the stream is a prefix of the final text (issue 15 item 4) ------------------------------


def streamed(assembler: TextAssembler, chunks: list[list[int]]) -> str:
    """Push `chunks` (one decoding step each) until a stop; the pieces shown, joined."""
    pieces = []
    for chunk in chunks:
        pieces.append(assembler.push(chunk))
        if assembler.stopped:
            break
    return "".join(pieces) + assembler.finish()


@pytest.mark.parametrize("text, stop", [
    ("中文字符 and more", "字符"),
    ("family 👨\u200d👩\u200d👧 here", "👨\u200d👩\u200d👧"),
    ("family 👨\u200d👩\u200d👧 here", "\u200d👩"),
])
def test_stop_string_beginning_is_not_shown_while_a_character_is_half_decoded(tokenizer, text, stop):
    ids = tokenizer(text).input_ids
    assembler = TextAssembler(tokenizer, [stop])
    shown = ""
    for token in ids:
        shown += assembler.push([token])
        assert text[: text.index(stop)].startswith(shown), f"showed {shown!r}"
        if assembler.stopped:
            break
    assert shown + assembler.finish() == assembler.text == text[: text.index(stop)]


def byte_fallback_tokenizer():
    """A real SentencePiece-style tokenizer with byte fallback, as Llama's: byte tokens <0xHH>
    decoded together by the ByteFallback decoder (one U+FFFD per byte of an unfinished run)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "\u2581": 257, "a": 258, "\u2581b": 259}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    model.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=model)


def test_byte_fallback_runs_are_held_until_settled():
    tokenizer = byte_fallback_tokenizer()
    ids = [258, *(b + 1 for b in "字符".encode()), 259]  # a, six byte tokens, " b"
    assert tokenizer.decode(ids[:3]).endswith("\ufffd\ufffd")  # one U+FFFD per pending byte
    assert tokenizer.decode(ids[:5]) == "a\ufffd\ufffd\ufffd\ufffd"  # 字 complete at 4, undone at 5
    final = tokenizer.decode(ids)
    for cut in range(1, len(ids) + 1):  # the stream, ended after any token, is a prefix of its text
        assembler = TextAssembler(tokenizer)
        shown = "".join(assembler.push([t]) for t in ids[:cut])
        assert (shown + assembler.finish()) == assembler.text == tokenizer.decode(ids[:cut])
        assert final.startswith(shown) and tokenizer.decode(ids[:cut]).startswith(shown)
    stopped = TextAssembler(tokenizer, "符")
    assert streamed(stopped, [ids]) == stopped.text == "a字" and stopped.token_ids == ids[:7]


def test_one_stop_string_is_not_split_into_letters(tokenizer):
    ids = tokenizer("Dear END of the road").input_ids
    as_str, as_list = TextAssembler(tokenizer, "END"), TextAssembler(tokenizer, ["END"])
    assert streamed(as_str, [ids]) == streamed(as_list, [ids]) == "Dear "
    assert as_str.token_ids == as_list.token_ids


@pytest.mark.parametrize("bad", [5, [b"END"], ["ok", None]])
def test_stop_must_be_strings(tokenizer, bad):
    with pytest.raises(ConfigError, match="stop"):
        TextAssembler(tokenizer, bad)


SNIPPETS = ["中文字符", "日本語のテキスト", "👨\u200d👩\u200d👧", "🎉🎉", "naïve café", " END", " the end.", "\n\n", "𝔘𝔫𝔦"]


@st.composite
def generations(draw, tokenizer):
    """Token ids from snippets (whole, or cut mid-character), single-byte tokens and random ids;
    stop strings drawn from their decoded text; and the ids split into decoding steps."""
    byte_ids = tokenizer.convert_tokens_to_ids(sorted(ByteLevel.alphabet()))  # a set: unordered
    unit = st.one_of(
        st.sampled_from(SNIPPETS).map(lambda s: tokenizer(s).input_ids),
        st.lists(st.sampled_from(byte_ids), min_size=1, max_size=3),
        st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=2),
    )
    ids = [t for part in draw(st.lists(unit, min_size=1, max_size=12)) for t in part]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(draw(st.integers(0, 2))):
        if text:
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start : draw(st.integers(start + 1, min(len(text), start + 6)))])
    sizes = draw(st.lists(st.integers(1, 8), min_size=len(ids), max_size=len(ids)))
    chunks, at = [], 0
    for size in sizes:
        if at < len(ids):
            chunks.append(ids[at : at + size])
            at += size
    return ids, stops, chunks


@settings(max_examples=300)
@given(data=st.data())
def test_stream_is_prefix_of_final_text_and_steps_do_not_matter(tokenizer, data):
    ids, stops, chunks = data.draw(generations(tokenizer))
    stepped, one_by_one = TextAssembler(tokenizer, stops), TextAssembler(tokenizer, stops)
    shown = streamed(stepped, chunks)
    assert shown == stepped.text  # every piece continued the ones before it
    assert streamed(one_by_one, [[t] for t in ids]) == one_by_one.text
    assert (stepped.text, stepped.token_ids, stepped.stopped) == (one_by_one.text, one_by_one.token_ids, one_by_one.stopped)
    assert not any(s and s in stepped.text for s in stops)
    # the token-by-token rule written out: the shortest prefix whose settled text holds a stop
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True).rstrip("\ufffd")
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            assert stepped.stopped and stepped.token_ids == ids[:end] and stepped.text == text[: min(hits)]
            return
    assert stepped.token_ids == ids


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
