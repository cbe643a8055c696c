"""`ragspec draft ...`: train and evaluate a small draft model for a target (ragspec.training)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from ragspec.cli_support import library_errors


@click.group("draft")
def draft_group():
    """Make a small draft model from the target (layer-pruned, distilled) and measure it.

    \b
    Example:
      ragspec draft train --threads 1
      ragspec draft eval
    """


def _target_options(command):
    options = [
        click.option("--model", "model", default=None, help="Target: HF model dir or .gguf file (default: embedded SmolLM2-135M-Instruct)."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("../shared/data"),
                     show_default=True, help="Folder with corpus/, longdoc/, nq_open/ and spec_bench/."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's)."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_target(model, threads, dtype="float32"):
    import torch
    from transformers.utils import logging as hf_logging

    from ragspec.models import load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    return load_model(model, dtype=dtype, device="cpu", kernels="plain")


@draft_group.command("train")
@_target_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output HF model dir (default: <cache dir>/draft-models/<target>).")
@click.option("--layers", default=None, help="Target layers the draft starts from, e.g. 0,1,2,29 (default: the first ones and the last).")
@click.option("--num-layers", type=click.IntRange(min=1), default=None, help="Draft decoder layers (default 4).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Sequences per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--prompts", "num_prompts", type=click.IntRange(min=0), default=None, help="Training prompts the target answers.")
@click.option("--text-windows", "num_text_windows", type=click.IntRange(min=0), default=None, help="Plain text windows.")
@click.option("--answer-tokens", type=click.IntRange(min=1), default=None, help="Longest target answer per prompt.")
@click.option("--seq-len", type=click.IntRange(min=8), default=None, help="Tokens per training sequence.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Teacher log-probabilities kept per position.")
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between checkpoints.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Run at most this many steps now and leave a checkpoint (continue with --resume).")
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in the output dir.")
@click.option("--restart", is_flag=True, help="Drop a checkpointed run in the output dir and start over.")
@library_errors
def train(model, data_dir, threads, quiet, out, layers, stop_after, resume, restart, **overrides):
    """Distil a draft model from the target on this machine (CPU).

    The target answers training prompts built from the book, L-Eval documents and NQ-open (never
    the Spec-Bench prompts); the draft learns its next-token distributions. The result is an HF
    model directory for `--draft-model`.

    Example: nice -n 10 ragspec draft train --threads 1

    On a CPU shared with other work, one thread: two threads fighting for a busy core ran the
    target's batched generation here more than 10x slower.
    """
    from ragspec.training import train_draft

    config = _config(data_dir, layers, overrides)
    target = _load_target(model, threads)
    from ragspec.training.draft import draft_layers

    draft_layers(target, config)  # bad layer numbers fail before any work
    click.echo(f"reproduce with: {_command(config, model, out, threads, target)}", err=True)
    result = train_draft(target, config, out, resume=resume, restart=restart, progress=not quiet, stop_after=stop_after)
    if not result.finished:
        click.echo(f"stopped at step {result.steps} of {config.steps}: continue with the same command and --resume")
        return
    size = sum(f.stat().st_size for f in result.path.iterdir() if f.is_file())
    click.echo(
        f"draft model: {result.path} ({size / 2**20:.1f} MiB, {result.steps} steps"
        f"{f', resumed at step {result.resumed_from}' if result.resumed_from else ''}); loss {result.first_loss:.3f} -> "
        f"{result.final_loss:.3f}; {result.num_sequences} sequences, {result.num_tokens} tokens; {result.wall_s:.0f} s"
    )


def _command(config, model, out, threads, target) -> str:
    """The full `ragspec draft train` command line that repeats this run, every setting spelled out."""
    from ragspec.training.draft import draft_layers

    layers = draft_layers(target, config)
    args = ["ragspec", "draft", "train", "--layers", ",".join(map(str, layers)), "--steps", config.steps,
            "--batch-size", config.batch_size, "--lr", config.lr, "--prompts", config.data.num_prompts,
            "--text-windows", config.data.num_text_windows, "--answer-tokens", config.answer_tokens,
            "--seq-len", config.seq_len, "--top-k", config.top_k, "--seed", config.seed,
            "--data-dir", config.data_dir]
    args += ["--model", model] if model else []
    args += ["--out", out] if out else []
    args += ["--threads", threads] if threads else []
    return shlex.join(str(a) for a in args)


def _config(data_dir: Path, layers: str | None, overrides: dict):
    from dataclasses import replace

    from ragspec.errors import ConfigError
    from ragspec.training import DraftTrainConfig

    config = DraftTrainConfig(data_dir=data_dir)
    data = {k: overrides.pop(k) for k in ("num_prompts", "num_text_windows") if overrides.get(k) is not None}
    if layers is not None:
        try:
            parsed = tuple(int(x) for x in layers.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--layers {layers!r}: give target layer numbers separated by commas, e.g. 0,1,2,29") from None
        overrides.update(layers=parsed, num_layers=len(parsed))
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if data:
        config = replace(config, data=replace(config.data, **data))
    config.check()
    return config


def _replay_options(command):
    """The options of the eval commands: which target answers are replayed, how deep."""
    command = click.option("--depth", type=click.IntRange(min=1), default=5, show_default=True,
                           help="Draft chain depth replayed.")(command)
    command = click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
                           help="Target answer length.")(command)
    return click.option("--per-category", type=click.IntRange(min=1), default=3, show_default=True,
                        help="Spec-Bench prompts per category.")(command)


@draft_group.command("eval")
@_target_options
@click.option("--draft", "draft_path", default="auto", show_default=True,
              help="Draft model dir; auto: the trained one for the target (trained first if missing).")
@_replay_options
@library_errors
def eval_command(model, data_dir, threads, quiet, draft_path, per_category, max_new_tokens, depth):
    """Top-1 agreement of the draft with the target and replayed chain speculation, per Spec-Bench
    category (the target's greedy answers, teacher-forced through the draft).

    Example: ragspec draft eval --per-category 3
    """
    from ragspec.models import load_model
    from ragspec.training import (
        evaluate_draft,
        format_table,
        resolve_draft_model,
        target_answers,
    )

    target = _load_target(model, threads)
    path = resolve_draft_model(draft_path, target)
    draft = load_model(path, dtype="float32", device="cpu", kernels="plain")
    items = target_answers(target, data_dir, per_category, max_new_tokens, progress=not quiet)
    click.echo(f"draft model: {path}")
    click.echo(format_table(evaluate_draft(draft.model, items, depth)))


@draft_group.command("train-eagle")
@_target_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: <cache dir>/eagle-heads/<target>, what --eagle-head auto uses).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Sequences per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Drafting depths unrolled in training.")
@click.option("--vocab-size", type=click.IntRange(min=2), default=None, help="Tokens the head drafts (most frequent).")
@click.option("--prompts", "num_prompts", type=click.IntRange(min=0), default=None, help="Training prompts the target answers.")
@click.option("--text-windows", "num_text_windows", type=click.IntRange(min=0), default=None, help="Plain text windows.")
@click.option("--answer-tokens", type=click.IntRange(min=1), default=None, help="Longest target answer per prompt.")
@click.option("--seed", type=click.IntRange(min=0), default=None)
@library_errors
def train_eagle_command(model, data_dir, threads, quiet, out, num_prompts, num_text_windows, answer_tokens, seed,
                        **overrides):
    """Train an EAGLE-style draft head for the target: one decoder layer reading the target's own
    hidden states (the "eagle" drafter). Same training text as `draft train` (the target's
    answers to prompts from the book, L-Eval and NQ-open, never Spec-Bench; cached), the target's
    hidden states computed once (cached); resumable: rerun the same command after an interruption.

    Example: ragspec draft train-eagle && ragspec draft eval-eagle
    """
    from dataclasses import replace

    from ragspec.training.eagle import EagleTrainConfig, eagle_data_config, train_eagle

    data_config = eagle_data_config(data_dir)
    plan = {k: v for k, v in (("num_prompts", num_prompts), ("num_text_windows", num_text_windows)) if v is not None}
    data_config = replace(data_config, data=replace(data_config.data, **plan),
                          **{k: v for k, v in (("answer_tokens", answer_tokens), ("seed", seed)) if v is not None})
    data_config.check()
    config = replace(EagleTrainConfig(), **{k: v for k, v in overrides.items() if v is not None},
                     **({"seed": seed} if seed is not None else {}))
    target = _load_target(model, threads)
    result = train_eagle(target, config, out, data_config=data_config, progress=not quiet)
    size = sum(f.stat().st_size for f in result.path.iterdir() if f.is_file())
    click.echo(f"EAGLE head: {result.path} ({size / 2**20:.1f} MiB, {result.steps} steps"
               f"{f', resumed at step {result.resumed_from}' if result.resumed_from else ''}); loss "
               f"{result.first_loss:.3f} -> {result.final_loss:.3f}; {result.num_tokens} tokens; {result.wall_s:.0f} s")


@draft_group.command("eval-eagle")
@_target_options
@click.option("--head", "head_path", default="auto", show_default=True,
              help="EAGLE head folder; auto: the one trained for the target (trained first if missing).")
@_replay_options
@click.option("--vocab", type=click.IntRange(min=1), default=None,
              help="Draft only the head's this many most frequent tokens (the eagle drafter's default: 8192).")
@library_errors
def eval_eagle_command(model, data_dir, threads, quiet, head_path, per_category, max_new_tokens, depth, vocab):
    """Per Spec-Bench category: how often the head's depth-1 draft is the target's next token,
    and greedy chains of `depth` replayed over the target's answers (each depth reading the
    head's own predicted features, as when drafting)."""
    from functools import partial

    from ragspec.drafting.eagle import load_head, resolve_head
    from ragspec.training import evaluate_draft, format_table, target_answers
    from ragspec.training.eagle import eagle_hits

    target = _load_target(model, threads)
    path = resolve_head(head_path, target)
    head = load_head(path, target, vocab)
    items = target_answers(target, data_dir, per_category, max_new_tokens, progress=not quiet)
    click.echo(f"EAGLE head: {path}")
    click.echo(format_table(evaluate_draft(None, items, depth, hits_of=partial(eagle_hits, head, target.model, depth=depth))))
