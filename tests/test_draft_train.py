"""`ragspec draft train`: a draft model distilled from a tiny target, checkpoints, resume, CLI.

The tiny target is conftest's 2-layer random Llama with its LM head scaled up: the random model's
own next-token distributions are nearly uniform, so a student matches them from the start and
there would be no loss to watch fall; scaled, they are peaked like a trained model's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DATA_DIR, build_tiny_model
from safetensors.torch import load_file

from ragspec.cli import main
from ragspec.errors import ModelNotFound, TokenizerMismatch
from ragspec.models import LoadedModel, load_model
from ragspec.training import (
    CheckpointError,
    DataPlan,
    DraftTrainConfig,
    default_draft_dir,
    distill_loss,
    resolve_draft_model,
    train_draft,
)
from ragspec.training.data import (
    benchmark_text,
    build_prompts,
    normalized,
    nq_questions,
)
from ragspec.drafting.eagle import load_head
from ragspec.training.draft import mean_loss, prepare_teacher_data
from ragspec.training.eagle import EagleTrainConfig, eagle_hits, train_eagle
from ragspec.training.evaluate import EvalItem, chain_steps, evaluate_draft
from ragspec.training.student import build_student

pytestmark = pytest.mark.skipif(not (DATA_DIR / "corpus").is_dir(), reason=f"training data not in {DATA_DIR}")

TINY = DraftTrainConfig(
    num_layers=1, seq_len=48, answer_tokens=12, data=DataPlan(num_prompts=8, num_text_windows=4), top_k=8,
    steps=12, batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=4, generation_batch=4, teacher_batch=4,
    data_dir=DATA_DIR, student_bf16=False,
)


@pytest.fixture(scope="module")
def peaked_target(tokenizer) -> LoadedModel:
    model = build_tiny_model("llama", len(tokenizer), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-peaked")


@pytest.fixture(scope="module")
def finished(peaked_target, tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that only read its result."""
    return train_draft(peaked_target, TINY, tmp_path_factory.mktemp("draft") / "whole", progress=False)


def test_tiny_run_gives_a_loadable_draft_with_the_targets_tokenizer(peaked_target, finished):
    draft = load_model(finished.path, dtype="float32", device="cpu", kernels="plain")
    assert draft.tokenizer_fingerprint == peaked_target.tokenizer_fingerprint
    assert draft.model.config.num_hidden_layers == 1
    assert not (finished.path / "training").exists()  # the checkpoint goes once the model is out
    metadata = json.loads((finished.path / "ragspec_draft.json").read_text())
    assert metadata["layers"] == [0] and metadata["steps"] == TINY.steps
    # the embedding and head stay the target's; the decoder layer learned
    assert torch.equal(draft.model.lm_head.weight, peaked_target.model.lm_head.weight)
    trained = draft.model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(trained, peaked_target.model.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():  # it runs as a causal LM over the target's vocabulary
        logits = draft.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(peaked_target.tokenizer))


def test_loss_falls_over_the_run(peaked_target, finished):
    assert all(np.isfinite(finished.losses)) and len(finished.losses) == TINY.steps
    data = prepare_teacher_data(peaked_target, TINY, progress=False)  # cached by the run: read back
    before = mean_loss(build_student(peaked_target.model, [0]), data)
    after = mean_loss(load_model(finished.path, dtype="float32", kernels="plain").model, data)
    assert after < 0.7 * before, (before, after)


def test_resumed_run_equals_an_uninterrupted_one(peaked_target, finished, tmp_path):
    out = tmp_path / "resumed"
    first = train_draft(peaked_target, TINY, out, progress=False, stop_after=5)
    assert not first.finished and first.steps == 5 and not (out / "config.json").exists()
    with pytest.raises(CheckpointError, match="--resume"):  # an unfinished run is not overwritten unasked
        train_draft(peaked_target, TINY, out, progress=False)
    second = train_draft(peaked_target, TINY, out, progress=False, resume=True)
    assert second.finished and second.resumed_from == 5 and second.steps == TINY.steps
    assert second.losses == finished.losses  # bit-identical: data order and lr are functions of the step
    whole, resumed = load_file(finished.path / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_damaged_checkpoint_is_a_clear_error(peaked_target, tmp_path):
    out = tmp_path / "damaged"
    train_draft(peaked_target, TINY, out, progress=False, stop_after=4)
    checkpoint = out / "training" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged.*--restart"):
        train_draft(peaked_target, TINY, out, progress=False, resume=True)
    restarted = train_draft(peaked_target, replace(TINY, steps=2), out, progress=False, restart=True)
    assert restarted.finished and restarted.resumed_from == 0


def test_resume_with_other_settings_is_refused(peaked_target, tmp_path):
    out = tmp_path / "other"
    train_draft(peaked_target, TINY, out, progress=False, stop_after=4)
    with pytest.raises(CheckpointError, match="lr: 0.003 there, 0.001 now"):
        train_draft(peaked_target, replace(TINY, lr=1e-3), out, progress=False, resume=True)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        train_draft(peaked_target, TINY, tmp_path / "none", progress=False, resume=True)


def test_distill_loss_is_the_kl_of_the_coarsened_distributions():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 40) * 3, torch.randn(5, 40) * 3
    logp = torch.log_softmax(teacher, -1)
    top_lp, top_ids = logp.topk(40, -1)
    full_kl = (logp.exp() * (logp - torch.log_softmax(student, -1))).sum(-1).mean()
    assert torch.allclose(distill_loss(student, top_ids, top_lp), full_kl, atol=1e-5)  # k = vocab: the full KL
    top_lp, top_ids = logp.topk(6, -1)
    assert float(distill_loss(teacher, top_ids, top_lp)) == pytest.approx(0.0, abs=1e-5)
    assert 0 < float(distill_loss(student, top_ids, top_lp)) <= float(full_kl) + 1e-5  # coarsening never adds


def test_chain_replay_counts_target_forwards():
    hits = np.array([True] * 12)
    assert chain_steps(hits, 5) == 2  # 5 drafts + bonus, twice
    assert chain_steps(np.zeros(4, dtype=bool), 5) == 4  # every step: the bonus token only
    assert chain_steps(np.array([True, False, True, True, False]), 5) == 2  # [hit, miss->bonus], [hit, hit, miss->bonus]
    per_depth = np.array([[True, True, True, True], [False, False, True, True]])  # an EAGLE head's hits by depth
    assert chain_steps(per_depth, 2) == 2  # [depth 1 hit, depth 2 (row 1) miss -> bonus], then [hit, hit at depth 2]


def test_eval_scores_a_perfect_draft_fully(peaked_target, tokenizer):
    prompt = tokenizer.encode("Question: what is up?")
    with torch.no_grad():
        answer = peaked_target.model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax().item()
    items = [EvalItem("qa", 1, prompt, [answer])]
    results = evaluate_draft(peaked_target.model, items, depth=5)  # the target drafting for itself
    assert results[0].category == "qa" and results[0].top1_agreement == 1.0 and results[0].tokens_per_step == 1.0


def test_training_prompts_leave_out_benchmark_questions():
    exclude = benchmark_text(DATA_DIR)
    questions = nq_questions(DATA_DIR, exclude)
    spec_qa = [json.loads(line)["turns"][0] for line in (DATA_DIR / "spec_bench" / "question.jsonl").read_text().splitlines()
               if '"category": "qa"' in line]
    all_nq = [json.loads(line)["question"] for line in (DATA_DIR / "nq_open" / "NQ-open.dev.jsonl").read_text().splitlines()]
    benchmark_in_nq = {normalized(q) for q in all_nq} & {normalized(q) for q in spec_qa}
    assert benchmark_in_nq  # the check below can fail: Spec-Bench's qa questions come from NQ-open
    assert not benchmark_in_nq & {normalized(q) for q in questions}
    prompts = build_prompts(DATA_DIR, DataPlan(num_prompts=60, nq_share=1.0), seed=0)
    assert len(prompts) == 60 and not any(normalized(p[0]["content"]) in exclude for p in prompts)


def test_resolve_draft_model(peaked_target, finished, tmp_path):
    with pytest.raises(ModelNotFound, match="no draft model at"):
        resolve_draft_model(str(tmp_path), peaked_target)
    with pytest.raises(ModelNotFound, match="ragspec draft train"):
        resolve_draft_model("auto", peaked_target, train_if_missing=False)
    assert resolve_draft_model(str(finished.path), peaked_target) == finished.path
    auto = train_draft(peaked_target, replace(TINY, steps=2), progress=False)  # into the (test) cache dir
    assert auto.path == default_draft_dir(peaked_target)
    assert resolve_draft_model("auto", peaked_target, train_if_missing=False) == auto.path
    metadata = auto.path / "ragspec_draft.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "tokenizer_fingerprint": "0" * 16}))
    with pytest.raises(TokenizerMismatch):
        resolve_draft_model("auto", peaked_target)


def invoke(*args):
    return CliRunner().invoke(main, ["draft", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def saved_target(peaked_target, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("target") / "tiny-peaked"
    peaked_target.model.save_pretrained(path)
    peaked_target.tokenizer.save_pretrained(path)
    return path


def test_cli_trains_a_tiny_draft_and_reports_a_damaged_checkpoint(saved_target, tmp_path):
    tiny = ["--model", str(saved_target), "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "d"), "--quiet",
            "--num-layers", "1", "--steps", "3", "--prompts", "4", "--text-windows", "2", "--answer-tokens", "8",
            "--seq-len", "32", "--top-k", "4"]
    stopped = invoke("train", *tiny, "--stop-after", "1")
    assert stopped.exit_code == 0, stopped.output
    assert "stopped at step 1 of 3" in stopped.output and "--layers 0 --steps 3" in stopped.output
    (tmp_path / "d" / "training" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    damaged = invoke("train", *tiny, "--resume")
    assert damaged.exit_code == 1
    checkpoint = tmp_path / "d" / "training" / "checkpoint.pt"
    errors = [line for line in damaged.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: training checkpoint {checkpoint} is damaged (")
    assert errors[0].endswith(f"delete {checkpoint} (or train with --restart) to start over")
    done = invoke("train", *tiny, "--restart")
    assert done.exit_code == 0, done.output
    assert f"draft model: {tmp_path / 'd'}" in done.output and "3 steps" in done.output


def test_cli_help_and_bad_arguments(saved_target):
    result = invoke("train", "--help")
    assert result.exit_code == 0 and "--resume" in result.output and "--draft-model" in result.output
    assert invoke("--help").exit_code == 0 and "eval" in invoke("--help").output
    for args, message in [
        (["--steps", "0"], "Error: Invalid value for '--steps'"),
        (["--layers", "x,1"], "Error: --layers 'x,1': give target layer numbers"),
        (["--model", str(saved_target), "--layers", "0,5"], "Error: draft layers [0, 5]: each must be a target layer 0..1"),
        (["--model", str(saved_target), "--num-layers", "1", "--resume", "--restart"], "Error: --resume and --restart contradict"),
        (["--data-dir", "/nonexistent"], "Error: training data folder /nonexistent does not exist"),
    ]:
        result = invoke("train", *args)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code != 0 and len(errors) == 1 and errors[0].startswith(message), result.output


TINY_EAGLE = EagleTrainConfig(vocab_size=512, depth=2, steps=6, batch_size=2, lr=3e-3, warmup_steps=1, feature_batch=4)


def test_tiny_eagle_head_trains_resumes_and_drafts(peaked_target, tmp_path):
    """An interrupted run resumed gives the head an uninterrupted run gives; the head loads back
    on its target, drafts only its token subset, and the eval replays its per-depth hits."""
    whole = train_eagle(peaked_target, TINY_EAGLE, tmp_path / "whole", data_config=TINY, progress=False)
    part = train_eagle(peaked_target, TINY_EAGLE, tmp_path / "split", data_config=TINY, progress=False, stop_after=4)
    assert not part.finished and not (tmp_path / "split" / "ragspec_eagle.json").exists()
    rest = train_eagle(peaked_target, TINY_EAGLE, tmp_path / "split", data_config=TINY, progress=False)
    assert whole.finished and rest.finished and rest.resumed_from == 4 and np.isfinite(whole.final_loss)
    heads = [load_head(tmp_path / name, peaked_target) for name in ("whole", "split")]
    for (name, a), b in zip(heads[0].state_dict().items(), heads[1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    ids = heads[0].vocab_ids  # EOS first, then the most frequent: any prefix is a smaller subset
    assert 0 < len(ids) <= 512 and len(set(ids.tolist())) == len(ids)
    assert set(ids[: len(peaked_target.eos_token_ids)].tolist()) == set(peaked_target.eos_token_ids)
    assert torch.equal(load_head(tmp_path / "whole", peaked_target, 8).vocab_ids, ids[:8])
    item = EvalItem("qa", 1, list(range(100, 120)), list(range(120, 130)))
    hits = eagle_hits(heads[0], peaked_target.model, item, depth=3)
    assert hits.shape == (3, 10)
    results = evaluate_draft(None, [item], depth=3, hits_of=lambda it: eagle_hits(heads[0], peaked_target.model, it, 3))
    assert results[0].top1_agreement == hits[0].mean()
