"""The llama.cpp backend (ragspec.backends.llamacpp) on the embedded GGUF file.

Skipped, with the reason, only where llama-cpp-python is not installed; `make llamacpp-check`
installs it and runs this file, and under CI (CI set) a missing llama_cpp fails instead.
"""

from __future__ import annotations

from dataclasses import replace

import importlib.util
import os

import numpy as np
import pytest
import torch

from conftest import FLAT_CURVE, spec_bench_questions
from ragspec import Engine, GenerationRequest, SpecConfig
from ragspec.errors import ConfigError
from ragspec.drafting.tree import node_paths
from ragspec.types import ROOT, AcceptResult, DraftTree
from test_lossless import MAX_NEW, OracleDrafter, lossless_prompts

if importlib.util.find_spec("llama_cpp") is None:
    reason = "llama-cpp-python is not installed: `make llamacpp-check` installs it and runs these tests"
    if os.environ.get("CI"):
        pytest.fail(f"the llama.cpp backend tests must run in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from ragspec.backends.llamacpp import DEAD_SEQUENCE, LlamaCppTarget, branch_sequences, load_llamacpp  # noqa: E402

pytestmark = pytest.mark.slow

# Largest |tree-verify logit - one-token-decode logit| allowed. Measured on the embedded Q4_1 GGUF
# with llama-cpp-python 0.3.36 (native build, AVX-512 EPYC, 2 cores): see
# test_tree_verify_logits_match_sequential_decoding.
LOGIT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def llama_target() -> LlamaCppTarget:
    return load_llamacpp(None)


def _tree(nodes: list[tuple[int, int]]) -> DraftTree:
    """A DraftTree from (token, parent) pairs."""
    tokens, parents = zip(*nodes)
    n = len(nodes)
    return DraftTree(token_ids=np.asarray(tokens, dtype=np.int64), parents=np.asarray(parents, dtype=np.int64),
                     scores=np.ones(n), sources=("test",) * n)


def _prompt(target) -> list[int]:
    messages = [{"role": "user", "content": "Name the planets of the solar system in order."}]
    return list(target.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def _greedy_path(target, prompt: list[int], length: int) -> list[int]:
    """`length` greedy tokens after `prompt`, one-token decoding."""
    verifier = target.new_verifier()
    verifier.prefill(prompt)
    pending, path = prompt[-1], []
    for _ in range(length):
        token = int(verifier.verify(pending, DraftTree.empty()).logits[0].argmax())
        verifier.commit(AcceptResult([], [], token))
        path.append(token)
        pending = token
    return path


def _sequential_logits(target, prompt: list[int], path: list[int]) -> torch.Tensor:
    """Logits after prompt[-1] and after each token of `path`, decoded one token at a time. [1 + len, vocab]"""
    verifier = target.new_verifier()
    verifier.prefill(prompt)
    rows, pending = [], prompt[-1]
    for token in [*path, None]:
        rows.append(verifier.verify(pending, DraftTree.empty()).logits[0])
        if token is not None:
            verifier.commit(AcceptResult([], [], token))
            pending = token
    return torch.stack(rows)


def _test_tree(greedy: list[int]) -> DraftTree:
    """The greedy path (6 nodes) with wrong siblings and a wrong subtree: 13 nodes, 5 leaves."""
    g = greedy
    return _tree([
        (g[0], ROOT),  # 0
        (g[0] + 1, ROOT),  # 1 wrong sibling
        (g[1], 0),  # 2
        (g[1] + 7, 0),  # 3 wrong
        (g[2], 2),  # 4
        (17, 1),  # 5 under the wrong sibling
        (g[3], 4),  # 6
        (g[3] + 3, 4),  # 7 wrong
        (g[4], 6),  # 8
        (g[5], 8),  # 9
        (400, 5),  # 10
        (g[5] + 1, 8),  # 11 wrong
        (g[0], 3),  # 12
    ])


def test_branch_sequences_tag_every_node_with_the_leaves_below_it():
    tree = _tree([(1, ROOT), (2, ROOT), (3, 0), (4, 0), (5, 2)])  # leaves 1, 3, 4
    assert branch_sequences(tree.parents) == [(2, 3), (1,), (3,), (2,), (3,)]


def test_tree_verify_logits_match_sequential_decoding(llama_target):
    """Every node's logits from one tree verify equal those of one-token decoding along its path."""
    prompt = _prompt(llama_target)
    greedy = _greedy_path(llama_target, prompt, 6)
    tree = _test_tree(greedy)
    verifier = llama_target.new_verifier()
    verifier.prefill(prompt)
    logits = verifier.verify(prompt[-1], tree).logits
    assert logits.shape == (1 + tree.num_nodes, llama_target.vocab_size)
    worst, flips = 0.0, 0
    for node, path in enumerate(node_paths(tree)):
        reference = _sequential_logits(llama_target, prompt, path)[-1]
        worst = max(worst, float((logits[node + 1] - reference).abs().max()))
        flips += int(logits[node + 1].argmax() != reference.argmax())
    pending_reference = _sequential_logits(llama_target, prompt, [])[0]
    worst = max(worst, float((logits[0] - pending_reference).abs().max()))
    print(f"tree verify vs one-token decoding: max |diff| {worst:.3g}, argmax flips {flips}")
    assert flips == 0
    assert worst <= LOGIT_TOLERANCE


def test_commit_leaves_the_kv_of_a_fresh_decode_of_the_committed_tokens(llama_target):
    prompt = _prompt(llama_target)
    greedy = _greedy_path(llama_target, prompt, 8)
    tree = _test_tree(greedy)
    verifier = llama_target.new_verifier()
    verifier.prefill(prompt)
    verifier.verify(prompt[-1], tree)
    verifier.commit(AcceptResult([0, 2, 4], greedy[:3], greedy[3]))  # accepted down a shared branch
    assert verifier.past_length == len(prompt) + 3
    llama, context = llama_target._llama, verifier.context
    assert llama.llama_memory_seq_pos_min(context.memory, 0) == 0
    assert llama.llama_memory_seq_pos_max(context.memory, 0) == verifier.past_length - 1
    for branch in range(1, 6):  # no branch sequence is left
        assert llama.llama_memory_seq_pos_max(context.memory, branch) == -1
    # the next step (one more tree over the rest of the greedy path) sees only the committed tokens
    after = verifier.verify(greedy[3], _tree([(greedy[4], ROOT), (greedy[5], 0), (9, ROOT)])).logits
    reference = _sequential_logits(llama_target, prompt, greedy[:6])
    assert float((after[0] - reference[4]).abs().max()) <= LOGIT_TOLERANCE
    assert float((after[1] - reference[5]).abs().max()) <= LOGIT_TOLERANCE
    assert float((after[2] - reference[6]).abs().max()) <= LOGIT_TOLERANCE
    # a rejected tree leaves the committed tokens and the pending one only
    verifier.commit(AcceptResult([], [], greedy[4]))
    assert llama.llama_memory_seq_pos_max(context.memory, 0) == verifier.past_length - 1
    assert llama.llama_memory_seq_pos_max(context.memory, 1) == -1
    assert context.dead_rows == 10 + 3  # the rejected rows wait in their cells for compaction
    # compaction (as when the context fills up) frees them and keeps sequence 0 exact
    context.compact()
    assert context.dead_rows == 0 and llama.llama_memory_seq_pos_max(context.memory, DEAD_SEQUENCE) == -1
    assert llama.llama_memory_seq_pos_max(context.memory, 0) == verifier.past_length - 1
    again = verifier.verify(greedy[4], _tree([(greedy[5], ROOT), (1, ROOT)])).logits
    assert float((again[0] - reference[5]).abs().max()) <= LOGIT_TOLERANCE
    assert float((again[1] - reference[6]).abs().max()) <= LOGIT_TOLERANCE


def test_tokenizer_chat_template_and_eos_agree_with_the_gguf(llama_target, real_model):
    tokenizer = llama_target.tokenizer
    texts = ["Hello world!", "  leading spaces and\ttabs\nnewlines", "naïve café – 東京 🙂", "x" * 50,
             "def f(x):\n    return x ** 2\n"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for text in [*texts, chat]:
        assert tokenizer(text).input_ids == llama_target.llama_tokenize(text, add_special=False), text
        assert real_model.tokenizer(text).input_ids == tokenizer(text).input_ids, text  # the transformers backend
    assert tokenizer.chat_template == llama_target.chat_template() == real_model.tokenizer.chat_template
    assert llama_target.eos_token_ids == real_model.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def _real_prompts(count: int) -> list[list[dict]]:
    questions = spec_bench_questions()
    if not questions:
        pytest.skip("spec_bench questions not present")
    chosen = [q for q in questions if q["category"] in ("summarization", "rag", "extraction")]
    chosen.sort(key=lambda q: len(q["turns"][0]))
    return [[{"role": "user", "content": q["turns"][0]}] for q in chosen[:count]]


def test_greedy_speculative_equals_plain_on_real_prompts(llama_target):
    fast_engine = Engine(llama_target, latency_curve=FLAT_CURVE)
    plain_engine = Engine(llama_target, latency_curve=FLAT_CURVE, prefix_cache=False)
    accepted = 0
    for prompt in _real_prompts(3):
        fast = fast_engine.generate(prompt, max_new_tokens=64, speculative=True)
        plain = plain_engine.generate(prompt, max_new_tokens=64, speculative=False)
        assert fast.token_ids == plain.token_ids
        assert fast.finish_reason == plain.finish_reason
        accepted += fast.stats.num_accepted_tokens
    assert accepted > 0, "no draft token accepted: the test proves nothing"


def test_adversarial_trees_and_prefix_reuse_stay_lossless(llama_target):
    """The lossless suite's adversarial oracle drafter (random wrong branches around the truth) and
    the prefix cache (a chat's next turn) on the llama.cpp backend."""
    plain_engine = Engine(llama_target, latency_curve=FLAT_CURVE, prefix_cache=False)
    prompts = lossless_prompts(llama_target.tokenizer)[::4]
    oracle_accepted = 0
    for i, prompt in enumerate(prompts):
        plain = plain_engine.generate(prompt, max_new_tokens=MAX_NEW + 16, speculative=False)
        reference = plain_engine.encode(prompt) + plain.token_ids

        def factory(engine, reference=reference, seed=i):
            return [OracleDrafter(reference, llama_target.vocab_size, seed)]

        engine = Engine(llama_target, latency_curve=FLAT_CURVE, drafter_factories=[factory])
        fast = engine.generate(prompt, max_new_tokens=MAX_NEW, speculative=True)
        assert fast.token_ids == plain.token_ids[:MAX_NEW], f"the oracle's trees changed the output for {prompt!r}"
        oracle_accepted += fast.stats.accepted_per_source.get("oracle", 0)
    assert oracle_accepted > len(prompts) * MAX_NEW // 4


def test_a_next_turn_reuses_whole_prefill_chunks_and_equals_a_cold_request(llama_target, monkeypatch):
    """A chat's next turn reuses the cached rows a cold prefill computes the same way (whole
    n_batch chunks from position 0), so its output is the cold engine's; with exact_prefix off
    it reuses every cached row."""
    story = "The river carried the old boat past the mill, the bridge and the church at dawn. " * 40
    first = [{"role": "user", "content": story + "Where did the boat go?"}]
    chunk = llama_target.options.n_batch
    plain_engine = Engine(llama_target, latency_curve=FLAT_CURVE, prefix_cache=False)
    assert chunk < len(plain_engine.encode(first)) < 2 * chunk
    for exact in (True, False):
        monkeypatch.setattr(llama_target, "options", replace(llama_target.options, exact_prefix=exact))
        chat = Engine(llama_target, latency_curve=FLAT_CURVE)
        answer = chat.generate(first, max_new_tokens=16)
        second = [*first, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "And then?"}]
        warm = chat.generate(second, max_new_tokens=32)
        if exact:
            assert warm.stats.cached_prompt_tokens == chunk
            assert warm.token_ids == plain_engine.generate(second, max_new_tokens=32, speculative=False).token_ids
        else:
            assert warm.stats.cached_prompt_tokens >= len(chat.encode(first))


def test_drafters_that_run_torch_layers_say_so_or_stay_off(llama_target):
    """The self drafter needs the target's torch layers: a clear error on llama.cpp. RAPID with the
    target as its drafter (on by default) stays off there: a request with a draft prompt gets the
    plain output instead of an AttributeError."""
    selfish = Engine(llama_target, latency_curve=FLAT_CURVE, spec=SpecConfig(drafters=("context", "self")))
    with pytest.raises(ConfigError, match="transformers backend"):
        selfish.generate("Hello", max_new_tokens=2)
    engine = Engine(llama_target, latency_curve=FLAT_CURVE, prefix_cache=False)
    prompt = "Summarize: the cat sat on the mat because the mat was warm."
    with_draft = engine.generate(GenerationRequest(prompt, max_new_tokens=12, draft_prompt="the mat was warm"))
    plain = engine.generate(prompt, max_new_tokens=12, speculative=False)
    assert with_draft.token_ids == plain.token_ids
    assert "rapid" not in with_draft.stats.accepted_per_source


def test_load_probes_the_exact_row_count_and_caches_it(llama_target, monkeypatch):
    """The probe at load found the largest verify size whose logits equal one-token decoding's:
    a chain of that many rows matches sequential decoding here, one more row does not (where the
    probe saw a switch below its limit), and a second load reads the cache instead of probing."""
    from ragspec.backends import llamacpp_probe
    from ragspec.backends.llamacpp import PROBE_LIMIT
    from ragspec.models import cache_dir

    found = llama_target.exact_rows
    assert llama_target.max_tree_nodes == found.rows - 1 >= 1
    assert all(diff <= llamacpp_probe.EXACT_TOLERANCE for rows, diff in found.checked.items() if rows <= found.rows)
    assert found.rows == PROBE_LIMIT or found.checked[found.rows + 1] > llamacpp_probe.EXACT_TOLERANCE
    # independently of the probe's own text: a greedy chain on another prompt
    prompt = _prompt(llama_target)
    rows = min(found.rows + 1, PROBE_LIMIT)
    path = _greedy_path(llama_target, prompt, rows - 1)
    reference = _sequential_logits(llama_target, prompt, path)
    verifier = llama_target.new_verifier()
    verifier.prefill(prompt)
    for count in sorted({found.rows, rows}):
        chain = _tree([(token, i - 1) for i, token in enumerate(path[: count - 1])])
        difference = float((verifier.verify(prompt[-1], chain).logits - reference[:count]).abs().max())
        verifier.discard()
        print(f"{count} rows: max |diff| {difference:.3g}")
        assert (difference <= LOGIT_TOLERANCE) == (count <= found.rows)
    # cached per GGUF + build + CPU + threads: read back, a different key is not
    cached = list((cache_dir() / "llamacpp").glob("exact-rows-*.json"))
    assert len(cached) == 1
    key = llamacpp_probe.probe_key(llama_target, min(PROBE_LIMIT, llama_target.options.n_batch))
    assert llamacpp_probe._read(cached[0], {**key, "threads": [99, 99]}) is None

    def no_probe(*args):
        raise AssertionError("probed again instead of reading the cache")

    monkeypatch.setattr(llamacpp_probe, "measure_exact_rows", no_probe)
    assert llamacpp_probe.exact_rows(llama_target, min(PROBE_LIMIT, llama_target.options.n_batch)) == found


def test_divergence_gap_is_read_on_llamacpp_greedys_own_path(llama_target):
    """bench.llamacpp_check.top2_gap judges a divergence on the logits llamacpp-greedy saw: the
    prompt decoded in n_batch chunks with its last token inside the last chunk (a chunk of 64 rows
    or more rounds differently from one-token decoding), as llama_cpp.Llama evaluates it."""
    import llama_cpp

    from ragspec.backends.llamacpp_probe import PROBE_TEXT
    from ragspec.bench.llamacpp_check import top2_gap

    ids = llama_target.tokenizer(PROBE_TEXT).input_ids[:150]  # one chunk of 150 rows
    llama = llama_cpp.Llama(model_path=str(llama_target.path), n_ctx=512, flash_attn=True, verbose=False)
    llama.eval(ids)
    logits = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llama.ctx),
                                                    shape=(llama_target.vocab_size,)).copy())
    top = logits.topk(2)
    gap, token = top2_gap(llama_target, ids, [])
    assert token == int(top.indices[0])
    assert gap == pytest.approx(float(top.values[0] - top.values[1]), abs=1e-6)
