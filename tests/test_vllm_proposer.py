"""RagspecProposer (ragspec.vllm) against vLLM-shaped inputs: int32 token_ids_cpu [max_num_reqs,
max_model_len], num_tokens_no_spec [max_num_reqs], sampled_token_ids per row (empty in prefill),
rows that move (condense, swaps), preemption and resume, identical prompts, the k cap. The batch
bookkeeping is ragspec.vllm.batch_sim (vLLM's, without vLLM); `make vllm-check` runs the
proposer inside vLLM itself. Only the index test builds an index (the embedded tokenizer and the
embedder); the rest runs on numpy alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from ragspec.errors import ConfigError
from ragspec.types import ROOT, DraftTree
from ragspec.vllm import ProposerSettings, RagspecProposer, best_chain
from ragspec.vllm.batch_sim import BatchSim, SimRequest

VOCAB = 5000


def proposer(k: int = 4, **settings) -> RagspecProposer:
    """Fixed min_score (BatchSim's steps take microseconds: there is no engine step to time)."""
    return RagspecProposer(settings=ProposerSettings(**{"adaptive": False, **settings}), num_speculative_tokens=k)


def copying_request(seed: int, phrase_len: int = 12, repeats: int = 6) -> SimRequest:
    """A prompt holding a phrase twice; the answer repeats that phrase: the context drafter's case."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(10, VOCAB, phrase_len).tolist()
    filler = rng.integers(10, VOCAB, 30).tolist()
    return SimRequest(prompt=filler + phrase + filler[:5] + phrase, oracle=(phrase * repeats)[: phrase_len * repeats])


def random_request(seed: int, answer: int = 40) -> SimRequest:
    """Nothing in the prompt predicts the answer."""
    rng = np.random.default_rng(seed)
    return SimRequest(prompt=rng.integers(10, VOCAB, 50).tolist(), oracle=rng.integers(10, VOCAB, answer).tolist())


def test_copying_requests_get_long_chains_and_the_cap_holds():
    p = proposer(k=3)
    sim = BatchSim(p, k=3, max_num_reqs=4, max_model_len=512)
    requests = [copying_request(i) for i in range(4)]
    for request in requests:
        sim.add(request)
    sim.run()
    assert sim.max_draft == 3  # chains reach k = 3 and never pass it (BatchSim raises on a longer one)
    for request in requests:
        assert request.output == request.oracle
        assert request.mean_acceptance_length > 2.5, request.mean_acceptance_length


def test_state_is_keyed_by_content_when_rows_move():
    """Rows swap every step and a finished request's row is refilled by the last one: each
    request keeps its state (no request is seen as new twice), and acceptance does not drop."""
    steady = proposer()
    sim = BatchSim(steady, k=4, max_num_reqs=4, max_model_len=512)
    for i in range(4):
        sim.add(copying_request(i, repeats=4 + i))  # different lengths: rows condense as they finish
    sim.run()

    moved = proposer()
    sim = BatchSim(moved, k=4, max_num_reqs=4, max_model_len=512)
    requests = [copying_request(i, repeats=4 + i) for i in range(4)]
    for request in requests:
        sim.add(request)
    step = 0
    while sim.running:
        sim.step()
        step += 1
        occupied = [i for i, r in enumerate(sim.rows) if r is not None]
        if len(occupied) >= 2:
            sim.swap(occupied[0], occupied[-1] if step % 2 else occupied[1])
    assert moved.counts["new"] == 4 and moved.counts["resumed"] == 0
    assert moved.counts["continued"] == steady.counts["continued"]
    for request in requests:
        assert request.mean_acceptance_length > 2.5


def test_preempted_request_resumes_with_its_state_and_its_answer_is_stored():
    p = proposer()
    sim = BatchSim(p, k=4, max_num_reqs=4, max_model_len=512)
    victim, other = copying_request(1, repeats=8), copying_request(2, repeats=8)
    sim.add(victim)
    sim.add(other)
    for _ in range(3):
        sim.step()
    produced = len(victim.output)
    sim.remove(victim)  # preempted: its row is gone, vLLM will re-prefill prompt + output
    sim.step()
    assert p.counts["departed"] == 1 and p.counts["answers"] == 1  # its answer so far went to the past store
    assert p.past.num_responses == 1
    sim.add(victim)
    sim.run()
    assert p.counts["resumed"] == 1 and p.counts["new"] == 2
    assert victim.output == victim.oracle and len(victim.output) > produced


def test_identical_prompts_keep_their_own_histories():
    """Two requests with one prompt and different answers (n > 1 sampling, or two users): after
    they diverge each row must draft from its own answer, not the other's."""
    rng = np.random.default_rng(5)
    prompt = rng.integers(10, VOCAB, 40).tolist()
    phrase_a, phrase_b = rng.integers(10, VOCAB, 10).tolist(), rng.integers(10, VOCAB, 10).tolist()
    a, b = SimRequest(prompt, phrase_a * 6), SimRequest(list(prompt), phrase_b * 6)
    p = proposer()
    sim = BatchSim(p, k=4, max_num_reqs=2, max_model_len=256)
    sim.add(a)
    sim.add(b)
    step = 0
    while sim.running:
        sim.step()
        step += 1
        if step % 3 == 0 and len(sim.running) == 2:
            sim.swap(0, 1)
    assert p.counts["new"] == 2
    assert a.mean_acceptance_length > 2.5 and b.mean_acceptance_length > 2.5


def test_empty_rows_prefill_and_no_match_give_empty_drafts():
    p = proposer()
    tokens = np.zeros((4, 64), dtype=np.int32)
    lengths = np.zeros(4, dtype=np.int32)
    tokens[1, :10] = np.arange(100, 110)
    lengths[1] = 10
    tokens[2, :6] = np.arange(200, 206)
    lengths[2] = 6
    # row 0 and 3 empty, row 1 in (chunked) prefill, row 2 just sampled token 205 (no earlier match)
    drafts = p.propose([[], [], [205], []], lengths, tokens)
    assert drafts == [[], [], [], []]
    tokens[2, 6:8] = [200, 201]  # now "200 201" occurred before: the drafter proposes what followed
    lengths[2] = 8
    drafts = p.propose([[], [], [200, 201], []], lengths, tokens)
    assert drafts[0] == drafts[1] == drafts[3] == []
    assert len(drafts[2]) >= 1 and drafts[2] == [202, 203, 204, 205][: len(drafts[2])]


def test_past_answers_draft_a_repeated_question():
    """The first asking has nothing to copy from; once it finished (its row gone), the same
    question drafts its answer from the past-responses store."""
    p = proposer()
    sim = BatchSim(p, k=4, max_num_reqs=2, max_model_len=256)
    first = random_request(7)
    sim.add(first)
    sim.run()
    again = random_request(7)
    sim.add(again)
    sim.run()
    assert first.mean_acceptance_length < 1.2
    assert again.mean_acceptance_length > 3.0
    assert p.counts["answers"] >= 1


def test_acceptance_calibrates_the_source():
    """Context drafts that the target keeps rejecting (the answer starts the prompt's phrase
    again and again, then always leaves it): what the next step shows accepted is learned, and
    the chains get shorter."""
    rng = np.random.default_rng(3)
    phrase = rng.integers(10, VOCAB, 8).tolist()
    prompt = phrase * 4  # the context drafter is sure the phrase goes on ...
    oracle = [t for _ in range(12) for t in phrase[:2] + rng.integers(10, VOCAB, 4).tolist()]  # ... it never does
    p = proposer(drafters=("context",), min_score=0.15)
    sim = BatchSim(p, k=4, max_num_reqs=1, max_model_len=256)
    request = SimRequest(prompt, oracle)
    sim.add(request)
    estimate = p._estimates["context"]
    trials, hits = sum(estimate._trials.values()), sum(estimate._hits.values())
    lengths = []
    while sim.running:
        sim.step()
        lengths.append(len(request.drafts))
    assert lengths[0] >= 3
    assert max(lengths[5:]) <= 2, lengths
    # learned from what each next step showed accepted: about 1 draft in 5 was right
    tested = sum(estimate._trials.values()) - trials
    right = sum(estimate._hits.values()) - hits
    assert tested >= 12 and right / tested < 0.5
    assert p.budget.calibration("context") != 1.0  # the budget saw the verdicts too


def test_best_chain_takes_the_path_with_most_expected_tokens():
    # root -> 1 (0.9) -> 2 (0.8) -> 3 (0.1); root -> 4 (0.95)
    tree = DraftTree(token_ids=np.array([1, 2, 3, 4]), parents=np.array([ROOT, 0, 1, ROOT]),
                     scores=np.array([0.9, 0.8, 0.1, 0.95]), sources=("a", "a", "a", "b"))
    chain = best_chain(tree, tree.scores, max_length=3)
    assert chain.token_ids.tolist() == [1, 2, 3]
    assert best_chain(tree, tree.scores, max_length=3, min_score=0.2).token_ids.tolist() == [1, 2]
    assert best_chain(tree, tree.scores, max_length=1).token_ids.tolist() == [4]
    assert best_chain(tree, tree.scores, max_length=3, min_score=0.99).num_nodes == 0


def test_settings_come_from_vllms_config():
    config = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=5),
                             additional_config={"ragspec": {"drafters": ["context"], "min_score": 0.3}})
    p = RagspecProposer(config)
    assert p.k == 5 and p.settings.drafters == ("context",) and p.past is None
    with pytest.raises(ConfigError, match="unknown ragspec settings"):
        ProposerSettings.from_mapping({"indx": "x"})
    with pytest.raises(ConfigError, match="recycling"):
        ProposerSettings(drafters=("context", "recycling"))


BLOCKED_IMPORTS = textwrap.dedent("""
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "sentence_transformers", "accelerate"):
                raise ImportError("blocked in this test: " + name)

    sys.meta_path.insert(0, Refuse())
    import ragspec
    from ragspec.vllm import RagspecProposer, ProposerSettings
    from ragspec.vllm.batch_sim import BatchSim, SimRequest
    import ragspec.drafting.registry, ragspec.drafting.datastore, ragspec.index.index, ragspec.engine.budget
    from ragspec import SpecConfig
    SpecConfig()
    p = RagspecProposer(settings=ProposerSettings(adaptive=False), num_speculative_tokens=4)  # BatchSim: no step cost
    phrase = list(range(100, 112))
    request = SimRequest(prompt=list(range(500, 530)) + phrase + [7, 8] + phrase, oracle=phrase * 4)
    sim = BatchSim(p, k=4, max_num_reqs=2, max_model_len=256)
    sim.add(request)
    sim.run()
    assert request.mean_acceptance_length > 2, request.mean_acceptance_length
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not loaded, loaded
    print("ok")
""")


def test_core_runs_without_torch_or_transformers():
    """What vLLM's environment imports: the proposer, the drafters, the index reader, SpecConfig."""
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_index_datastore_drafts_through_the_proposer(tmp_path, tokenizer):
    """An index given in the settings opens read-only (memory-mapped) and its datastore drafts:
    a request quoting the indexed text gets the text's continuation as its chain."""
    from ragspec.index import build_index_from_texts

    text = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great lamp, "
            "and wrote the weather, the ships he saw and the state of the sea into a leather logbook.")
    index, _ = build_index_from_texts([("log", text)], "lighthouse", tmp_path, tokenizer=tokenizer,
                                      chunk_tokens=64, overlap_tokens=8)
    p = proposer(drafters=(), index=str(index.path))
    assert p.settings.drafters == ("datastore",)
    tokens = p.index.datastore.tokens
    assert isinstance(tokens, np.memmap) and tokens.mode == "r"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    request = SimRequest(prompt=tokenizer("Tell me about it.", add_special_tokens=False).input_ids + ids[:12],
                         oracle=ids[12:40])
    sim = BatchSim(p, k=4, max_num_reqs=1, max_model_len=256)
    sim.add(request)
    sim.run()
    assert request.mean_acceptance_length > 3.0, request.mean_acceptance_length


class TreePathProposer(RagspecProposer):
    """The proposer drafting through DraftTrees, as ragspec's engine does (each drafter's
    `propose`, `fuse`, `NodeBudget.calibrated_scores`, `best_chain`): the list-based fast path
    must choose exactly the same chains."""

    def _draft(self, state, min_score, factors):
        from ragspec.drafting.base import DraftContext
        from ragspec.drafting.continuations import ScoredTrie
        from ragspec.drafting.tree import fuse
        from ragspec.vllm.proposer import Proposal

        context = DraftContext(tokens=state.tokens.view(), max_nodes=self.spec.max_nodes)
        trees, tries = [], []
        for drafter in state.drafters if self.past is None else [*state.drafters, self.past]:
            tree = drafter.propose(context)
            if tree.num_nodes:
                trees.append(tree)
                tries.append((drafter.estimate, ScoredTrie(drafter.name, tree.token_ids.tolist(), tree.parents.tolist(),
                                                           tree.scores.tolist(), drafter._last_buckets)))
        if not trees:
            return []
        tree = trees[0] if len(trees) == 1 else fuse(trees)
        chain = best_chain(tree, self.budget.calibrated_scores(tree), self.k, min_score)
        if not chain.num_nodes:
            return []
        state.proposal = Proposal(chain.token_ids.tolist(), chain.sources, chain.scores.tolist(), tries)
        return chain.token_ids.tolist()


def test_fast_path_drafts_what_the_tree_path_drafts():
    """Same batch, same steps (rows moving, a preemption, repeated questions so that the past
    store and fusing take part): every step's drafts are identical."""
    def run(cls) -> list:
        p = cls(settings=ProposerSettings(adaptive=False, min_score=0.05), num_speculative_tokens=5)
        sim = BatchSim(p, k=5, max_num_reqs=3, max_model_len=512)
        queue = [copying_request(i % 3, repeats=3 + i % 2) for i in range(7)] + [random_request(1)]
        log, step, preempted = [], 0, None
        while queue or sim.running or preempted:
            while queue and len(sim.running) < 3:
                sim.add(queue.pop(0))
            if preempted is not None and len(sim.running) < 3:
                sim.add(preempted)
                preempted = None
            log.append(sim.step())
            step += 1
            if step % 3 == 0 and len(sim.running) >= 2:
                sim.swap(0, len(sim.running) - 1)
            if step == 7 and preempted is None and len(sim.running) >= 2:
                preempted = sim.running[1]
                sim.remove(preempted)
        return log, p

    fast, fast_proposer = run(RagspecProposer)
    tree_path, _ = run(TreePathProposer)
    assert fast == tree_path
    assert fast_proposer.counts["resumed"] == 1 and fast_proposer.past.num_responses >= 3
    assert sum(len(d) for step in fast for d in step) > 50
