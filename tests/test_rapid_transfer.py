"""RAPID's lossy knowledge transfer (opt-in): the formula by hand, the hook reads only RAPID's q,
eta = 0 changes nothing (output equal to plain decoding, no hook installed), and eta > 0 makes
greedy decoding follow argmax p^ token by token and sampling draw from p^, both checked against
p^ computed from plain forwards of a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import FLAT_CURVE
from test_model_drafter import sharp_tiny
from test_rapid import DOCUMENT, QUESTION, long_prompt, rapid_engine
from ragspec.config import SamplingConfig
from ragspec.drafting.rapid import RapidConfig, build_rapid_drafter
from ragspec.drafting.rapid_transfer import LossyTransfer, shifted_scores
from ragspec.drafting.registry import DraftRequest
from ragspec.drafting.tree import subtree
from ragspec.engine.budget import NodeBudget
from ragspec.engine.loop import decode_steps
from ragspec.errors import ConfigError
from ragspec.sampling import target_probs
from ragspec.types import ROOT, DraftTree, ModelDraws, SpecStats

ETA = 8.0


def test_the_shift_by_hand():
    """p = (.5, .3, .2), q = (.1, .85, .05), eta 2, alpha .1: tokens 0 and 1 are confident
    (q >= .085), token 2 is not; z' = log p + 2 * (-.4, .55, 0), and the argmax moves to 1."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.1, 0.85, 0.05])
    shifted = shifted_scores(p.log(), q, eta=2.0, confidence=0.1)
    expected = [math.log(0.5) - 0.8, math.log(0.3) + 1.1, math.log(0.2)]
    assert shifted.tolist() == pytest.approx(expected, abs=1e-6)
    assert int(shifted.argmax()) == 1 and int(p.argmax()) == 0
    # a stricter confidence keeps token 0 out of the shift; eta 0 is the identity
    assert shifted_scores(p.log(), q, 2.0, confidence=0.5).tolist() == pytest.approx(
        [math.log(0.5), math.log(0.3) + 1.1, math.log(0.2)], abs=1e-6)
    assert torch.equal(shifted_scores(p.log(), q, 0.0, 0.1), p.log())
    # q on a narrower vocabulary is zero-padded (the padded tokens are never confident)
    assert shifted_scores(torch.zeros(4), q, 1.0, 0.1)[3] == 0.0


def two_row_tree(q_root: torch.Tensor, q_node: torch.Tensor) -> DraftTree:
    """One node; q at the root from RAPID, q at the node from another model drafter."""
    return DraftTree(token_ids=np.array([1]), parents=np.array([ROOT]), scores=np.array([0.5]), sources=("rapid",),
                     draws={ROOT: (ModelDraws(q_root, (), source="rapid"),), 0: (ModelDraws(q_node, ()),)})


def test_the_transfer_shifts_only_the_rows_where_rapid_left_its_q():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
    q = torch.tensor([0.05, 0.05, 0.1, 0.8])
    transfer = LossyTransfer(eta=4.0)
    greedy = SamplingConfig()
    scores, sampling = transfer(two_row_tree(q, q), logits, greedy)
    assert sampling is greedy
    assert torch.equal(scores[1], logits[1])  # another drafter's q: untouched
    assert torch.allclose(scores[0], shifted_scores(logits[0], q, 4.0, 0.1))
    assert int(scores[0].argmax()) == 3 and int(logits[0].argmax()) == 0

    hot = SamplingConfig(temperature=0.7, top_k=3, seed=5)
    scores, sampling = transfer(two_row_tree(q, q), logits, hot)
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed) == (1.0, 0, 1.0, 5)
    p = target_probs(logits, hot)
    assert torch.allclose(target_probs(scores, sampling)[1], p[1], atol=1e-6)  # plain p where RAPID has no q
    expected = shifted_scores(p[0].log(), q, 4.0, 0.1).softmax(-1)
    assert torch.allclose(target_probs(scores, sampling)[0], expected, atol=1e-6)
    assert float(target_probs(scores, sampling)[0, 3]) == 0.0  # top-k dropped it: p^ never draws it
    no_rapid = DraftTree.empty()
    assert transfer(no_rapid, logits, hot) == (logits, hot)


def test_config_is_lossless_by_default_and_names_the_lossy_knob():
    assert RapidConfig().lossy_transfer() is None
    assert RapidConfig(lossy_transfer_eta=0.0).tree().cost_aware
    on = RapidConfig(lossy_transfer_eta=10.0, lossy_transfer_confidence=0.2)
    assert on.lossy_transfer() == LossyTransfer(10.0, 0.2, source="rapid")
    assert not on.tree().cost_aware  # which rows are shifted must not depend on timings
    for bad in ({"lossy_transfer_eta": -1.0}, {"lossy_transfer_eta": math.inf},
                {"lossy_transfer_eta": 1.0, "lossy_transfer_confidence": 1.5}):
        with pytest.raises(ConfigError):
            RapidConfig(**bad)


def test_eta_zero_changes_nothing_and_eta_above_zero_changes_greedy_answers(tokenizer):
    """The engine, RAPID reading the bare question: eta 0 (explicitly) installs no hook and answers
    as plain decoding; a large eta changes the answers (the tiny target's p and its own q over the
    short context disagree)."""
    target = sharp_tiny("llama", tokenizer, seed=0)
    off = rapid_engine(target, cost_aware=False, lossy_transfer_eta=0.0)
    on = rapid_engine(target, lossy_transfer_eta=ETA)
    drafter = build_rapid_drafter(DraftRequest(off, [1, 2, 3], SamplingConfig(), draft_prompt_ids=[1, 2]),
                                  RapidConfig(lossy_transfer_eta=0.0))
    assert drafter.lossy_target is None
    changed = 0
    for question in (QUESTION, "Which animal sat near the river?"):
        prompt, draft = long_prompt(DOCUMENT, question), [{"role": "user", "content": question}]
        plain = off.generate(prompt, max_new_tokens=16, speculative=False)
        assert off.generate(prompt, max_new_tokens=16, draft_prompt=draft).token_ids == plain.token_ids
        lossy = on.generate(prompt, max_new_tokens=16, draft_prompt=draft)
        assert lossy.stats.num_draft_tokens > 0  # the drafter ran: its q was there to shift toward
        changed += lossy.token_ids != plain.token_ids
    assert changed > 0, "eta > 0 changed no answer: the test proves nothing"


class RootOnly:
    """The RAPID drafter, its tree cut to no nodes but its q at the root kept: every step emits one
    token, argmax p^ (greedy) or a sample of p^, at the pending token."""

    def __init__(self, inner):
        self.inner, self.name, self.lossy_target = inner, inner.name, inner.lossy_target

    def propose(self, context):
        tree = self.inner.propose(context)
        return subtree(tree, np.zeros(tree.num_nodes, dtype=bool))

    def observe(self, step):
        self.inner.observe(step)


def rapid_steps(target, engine, prompt_ids, draft_ids, sampling, *, root_only: bool, eta: float = ETA,
                max_depth: int = 6):
    drafter = build_rapid_drafter(DraftRequest(engine, prompt_ids, sampling, draft_prompt_ids=draft_ids),
                                  RapidConfig(lossy_transfer_eta=eta, max_depth=max_depth))
    from ragspec.verify import TreeVerifier

    return decode_steps(TreeVerifier(target), prompt_ids, drafters=[RootOnly(drafter) if root_only else drafter],
                        budget=NodeBudget(FLAT_CURVE, 16), sampling=sampling, stats=SpecStats())


@torch.inference_mode()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_greedy_with_the_transfer_follows_argmax_p_hat_token_by_token(tokenizer):
    """Reference from plain forwards: z over the whole prompt, q over the draft prompt, both with
    the tokens generated so far; the loop's tokens are argmax(z + eta * M * (q - p)) each time,
    and differ from plain greedy's."""
    target = sharp_tiny("llama", tokenizer, seed=0)
    engine = rapid_engine(target)
    prompt_ids = engine.encode(long_prompt(DOCUMENT, QUESTION))
    draft_ids = engine.encode([{"role": "user", "content": QUESTION}])
    steps = rapid_steps(target, engine, prompt_ids, draft_ids, SamplingConfig(), root_only=True)
    generated: list[int] = []
    while len(generated) < 12:
        generated += next(steps)[0]
    steps.close()
    expected, plain = [], []
    for t in range(12):
        z = last_logits(target.model, prompt_ids + expected)
        q = last_logits(target.model, draft_ids + expected).softmax(-1)
        expected.append(int(shifted_scores(z, q, ETA, 0.1).argmax()))
        plain.append(int(last_logits(target.model, prompt_ids + plain).argmax()))
    assert generated[:12] == expected
    assert expected != plain


def test_sampling_with_the_transfer_draws_the_first_token_from_p_hat(tokenizer):
    """The first token (shifted at the prefill step with RAPID's q at the root, its drawn tokens
    accepted or rejected against p^) follows p^ exactly and not the target's own p. (Where the
    target's and the drafter's likely tokens differ, the shift is small unless eta is large: here
    p's top token has .37, p^'s .74.)"""
    from test_sampling_model_drafts import PASS_P_VALUE, chi_square_p_value, sharpened_tiny_llama

    target = sharpened_tiny_llama(tokenizer)
    engine = rapid_engine(target)
    prompt_ids = engine.encode("the cat sat on the mat")
    draft_ids = engine.encode("dog")
    sampling, eta = SamplingConfig(temperature=0.5), 50.0
    p = target_probs(last_logits(target.model, prompt_ids)[None], sampling)[0]
    q = target_probs(last_logits(target.model, draft_ids)[None], sampling)[0]
    p_hat = shifted_scores(p.log(), q, eta, 0.1).softmax(-1).double().numpy()
    counts = np.zeros(len(p_hat))
    for seed in range(150):
        steps = rapid_steps(target, engine, prompt_ids, draft_ids, SamplingConfig(temperature=0.5, seed=seed),
                            root_only=False, eta=eta, max_depth=1)
        counts[next(steps)[0][0]] += 1
        steps.close()
    assert chi_square_p_value(counts, p_hat)[2] > PASS_P_VALUE
    assert chi_square_p_value(counts, p.double().numpy())[2] < 1e-6, "p^ too close to p: the test proves nothing"


def test_the_cli_flag_needs_rapid_and_a_document(tmp_path):
    from click.testing import CliRunner

    from ragspec.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("The cat sat on the mat.", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["ask", "--doc", str(doc), "--rapid-lossy-eta", "5", "Where?"])
    assert result.exit_code == 2 and "needs --rapid" in result.output
    result = runner.invoke(main, ["ask", "--index", "x", "--rapid-lossy-eta", "5", "Where?"])
    assert result.exit_code == 2 and "needs --doc" in result.output
    result = runner.invoke(main, ["ask", "--doc", str(doc), "--rapid", "--rapid-lossy-eta", "-1", "Where?"])
    assert result.exit_code == 2
