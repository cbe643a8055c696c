"""Train a small draft model for a target by knowledge distillation, on this machine's CPU.

The student (ragspec.training.student) is the target cut down to a few of its decoder layers; it
learns the target's next-token distribution at every position of (mostly) the target's own
answers (ragspec.training.data, ragspec.training.teacher). Loss: KL(teacher || student) over the
teacher's top-k tokens plus one bucket for all other tokens (`distill_loss`). The result is an
ordinary HF model directory: any drafter that runs HF models can use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ragspec.errors import ConfigError
from ragspec.models import LoadedModel, cache_dir, pick_dtype
from ragspec.training.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from ragspec.training.data import DataPlan, build_prompts, text_windows
from ragspec.training.student import (
    build_student,
    check_layers,
    decoder_layers,
    default_layers,
    plain_copy,
)
from ragspec.training.schedule import batch_rows, learning_rate
from ragspec.training.teacher import (
    ShardCache,
    TeacherData,
    as_teacher_data,
    cache_key,
    generate_answers,
    teacher_topk,
)

log = logging.getLogger(__name__)

METADATA_FILE = "ragspec_draft.json"  # written last: a directory with it holds a finished draft model
DEFAULT_DATA_DIR = Path("../shared/data")


@dataclass(frozen=True)
class DraftTrainConfig:
    """Settings of one training run. Measured: 160 prompts (96-token answers), 48 windows and 400
    steps took 20.7 min on a 2-core CPU shared with other work (about half a core for this run);
    the defaults have about twice that data and 1.5x the steps."""

    num_layers: int = 4  # decoder layers of the student
    layers: tuple[int, ...] | None = None  # which target layers they start from; None: first ones + last
    seq_len: int = 256  # tokens per training sequence
    answer_tokens: int = 128  # the target answers each training prompt with at most this many tokens
    data: DataPlan = field(default_factory=DataPlan)
    top_k: int = 32  # teacher log-probabilities kept per position
    steps: int = 600
    batch_size: int = 2  # sequences per step
    lr: float = 5e-4
    warmup_steps: int = 30
    weight_decay: float = 0.0
    train_embeddings: bool = False  # the tied embedding / LM head stays the target's by default
    seed: int = 0
    data_dir: Path = DEFAULT_DATA_DIR
    teacher_dtype: str = "auto"  # the target's dtype for answers and logits; auto: bf16 where fast
    student_bf16: bool | None = None  # bf16 autocast for the student's matmuls; None: where fast
    generation_batch: int = 16
    teacher_batch: int = 8
    checkpoint_every: int = 50

    def check(self) -> None:
        for name in ("num_layers", "seq_len", "answer_tokens", "top_k", "steps", "batch_size",
                     "generation_batch", "teacher_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"draft training: {name} must be at least 1, not {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("draft training: lr must be positive, warmup_steps and weight_decay not negative")
        if self.data.num_prompts + self.data.num_text_windows < 1:
            raise ConfigError("draft training needs at least one prompt or text window")
        if not Path(self.data_dir).is_dir():
            raise ConfigError(f"training data folder {self.data_dir} does not exist: pass --data-dir")


@dataclass(frozen=True)
class DraftTrainResult:
    path: Path  # the HF model directory
    steps: int
    final_loss: float  # mean loss over the last 10% of steps
    first_loss: float  # mean loss over the first 10% of steps
    losses: list[float]  # [steps]
    wall_s: float  # this call, data preparation included
    num_sequences: int
    num_tokens: int  # teacher positions in the training data
    resumed_from: int  # the step a resumed run started at (0: a fresh run)
    finished: bool = True  # False: stopped early (stop_after), checkpointed, not exported


def default_draft_dir(target: LoadedModel) -> Path:
    """Where the draft model of `target` lives by default (keyed by the target's identity)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target.name)
    return cache_dir() / "draft-models" / f"{safe}-{target.identity}"


def is_trained(path: Path) -> bool:
    return (path / METADATA_FILE).is_file() and (path / "config.json").is_file()


def train_draft(target: LoadedModel, config: DraftTrainConfig = DraftTrainConfig(), out_dir: Path | None = None,
                *, resume: bool = False, restart: bool = False, progress: bool = True,
                stop_after: int | None = None) -> DraftTrainResult:
    """Distil a draft model from `target` into `out_dir` (default: `default_draft_dir`).

    A checkpoint is written to `out_dir/training/` every `checkpoint_every` steps; `resume`
    continues from it (same settings), `restart` drops it; with neither, an existing checkpoint
    is an error rather than silently lost work. `stop_after`: run at most that many steps now and
    leave the checkpoint (a time-boxed share of a busy machine). Teacher data is cached under the cache dir and
    reused by any run with the same data settings."""
    config.check()
    start = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else default_draft_dir(target)
    layers = draft_layers(target, config)
    settings = _settings(target, config, layers)
    checkpoint_path = out_dir / "training" / CHECKPOINT_FILE
    state = _starting_state(checkpoint_path, settings, resume, restart)
    data = prepare_teacher_data(target, config, progress=progress)
    student = build_student(target.model, layers)
    trainer = DraftTrainer(student, data, config)
    if state is not None:
        trainer.restore(state)
    resumed_from = trainer.step
    trainer.run(checkpoint_path, settings, progress=progress,
                stop_at=None if stop_after is None else resumed_from + stop_after)
    losses = trainer.losses  # every step's, resumed runs included
    tail = max(1, len(losses) // 10)
    result = DraftTrainResult(
        path=out_dir, steps=trainer.step, final_loss=float(np.mean(losses[-tail:])),
        first_loss=float(np.mean(losses[:tail])), losses=list(trainer.losses), wall_s=time.perf_counter() - start,
        num_sequences=len(data.lengths), num_tokens=data.num_tokens, resumed_from=resumed_from,
        finished=trainer.step >= config.steps)
    if not result.finished:
        return result
    export_draft(student, target, out_dir, layers, config, result)
    checkpoint_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # empty once the run is finished
        checkpoint_path.parent.rmdir()
    return result


def draft_layers(target: LoadedModel, config: DraftTrainConfig) -> tuple[int, ...]:
    """The target layers the student starts from (checked before any work is done)."""
    count = len(decoder_layers(target.model))
    return check_layers(config.layers, count) if config.layers else default_layers(count, config.num_layers)


def _settings(target: LoadedModel, config: DraftTrainConfig, layers: tuple[int, ...]) -> str:
    """What a checkpoint must agree on to be resumed (everything that changes the result)."""
    fields = asdict(config)
    for name in ("checkpoint_every",):
        fields.pop(name)
    fields.update(layers=list(layers), target=f"{target.name}-{target.identity}",
                  data_dir=str(Path(config.data_dir).resolve()))
    return json.dumps(fields, sort_keys=True, default=str)


def _starting_state(path: Path, settings: str, resume: bool, restart: bool) -> TrainState | None:
    if resume and restart:
        raise ConfigError("--resume and --restart contradict each other: pick one")
    if restart:
        path.unlink(missing_ok=True)
        return None
    if resume:
        return load_checkpoint(path, settings)
    if path.exists():
        raise CheckpointError(f"{path} holds an unfinished training run: resume it (--resume) or start over (--restart)")
    return None


def prepare_teacher_data(target: LoadedModel, config: DraftTrainConfig, progress: bool = True) -> TeacherData:
    """The target's answers to the training prompts plus text windows, with the target's top-k
    log-probabilities after every position: computed once per data setting, then read from disk."""
    from tqdm.auto import tqdm

    teacher_dtype = pick_dtype(torch.device("cpu"), None if config.teacher_dtype == "auto" else config.teacher_dtype)
    key = cache_key(target=f"{target.name}-{target.identity}", tokenizer=target.tokenizer_fingerprint,
                    data=asdict(config.data), seq_len=config.seq_len, answer_tokens=config.answer_tokens,
                    top_k=config.top_k, seed=config.seed, dtype=str(teacher_dtype),
                    batch=config.generation_batch, data_dir=str(Path(config.data_dir).resolve()))
    cache = ShardCache(cache_dir() / "draft-data" / key)
    teacher = _LazyTeacher(target, teacher_dtype)
    tokenizer = target.tokenizer
    prompts = [_encode_chat(tokenizer, p) for p in build_prompts(Path(config.data_dir), config.data, config.seed)]
    prompts = sorted((p[-(config.seq_len - 16):] for p in prompts), key=len)  # similar lengths batch together
    sequences: list[list[int]] = []
    batches = range(0, len(prompts), config.generation_batch)
    for number, begin in enumerate(tqdm(batches, desc="target answers", unit="batch", disable=not progress)):
        batch = prompts[begin:begin + config.generation_batch]
        stored = cache.get(f"answers-{number:05d}", partial(_answers, teacher, tokenizer, batch, config, target))
        sequences += [p + a for p, a in zip(batch, _unflatten(stored))]
    sequences += text_windows(tokenizer, Path(config.data_dir), config.data.num_text_windows, config.seq_len, config.seed)
    parts = []
    groups = range(0, len(sequences), config.teacher_batch)
    for number, begin in enumerate(tqdm(groups, desc="teacher logits", unit="batch", disable=not progress)):
        group = sequences[begin:begin + config.teacher_batch]
        stored = cache.get(f"teacher-{number:05d}", partial(_topk, teacher, group, config))
        parts.append(as_teacher_data(stored, config.top_k))
    return TeacherData.concat(parts)


class _LazyTeacher:
    """A plain copy of the target in the teacher dtype, made only if a shard must be computed."""

    def __init__(self, target: LoadedModel, dtype: torch.dtype):
        self.target, self.dtype, self._model = target, dtype, None

    @property
    def model(self):
        if self._model is None:
            self._model = plain_copy(self.target.model, self.dtype)
        return self._model


def _encode_chat(tokenizer, messages) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _topk(teacher: _LazyTeacher, sequences: list[list[int]], config: DraftTrainConfig) -> dict[str, np.ndarray]:
    return teacher_topk(teacher.model, sequences, config.seq_len, config.top_k)


def _answers(teacher: _LazyTeacher, tokenizer, prompts, config: DraftTrainConfig, target: LoadedModel) -> dict[str, np.ndarray]:
    answers = generate_answers(teacher.model, tokenizer, prompts, config.answer_tokens, target.eos_token_ids)
    offsets = np.cumsum([0] + [len(a) for a in answers]).astype(np.int64)
    flat = np.array([t for a in answers for t in a], dtype=np.int32)
    return {"tokens": flat, "offsets": offsets}


def _unflatten(stored: dict[str, np.ndarray]) -> list[list[int]]:
    tokens, offsets = stored["tokens"], stored["offsets"]
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def distill_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over positions, with the vocabulary seen as the teacher's k
    likeliest tokens plus one bucket holding every other token.

    student_logits [positions, vocab]; topk_ids [positions, k] long; topk_logprobs [positions, k].
    This is the exact KL between the two distributions coarsened to those k + 1 outcomes: zero only
    when the student gives each top-k token the teacher's probability and the rest its total mass;
    it needs k values per position instead of the whole vocabulary on disk."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    logq_top = logq.gather(-1, topk_ids)
    logp_top = topk_logprobs.float()
    p_top = logp_top.exp()
    p_rest = (1.0 - p_top.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - logq_top.exp().sum(-1)).clamp(min=1e-6)
    kl = (p_top * (logp_top - logq_top)).sum(-1) + p_rest * (p_rest.clamp(min=1e-6).log() - q_rest.log())
    return kl.mean()


@torch.inference_mode()
def mean_loss(model: torch.nn.Module, data: TeacherData, rows: Sequence[int] | None = None) -> float:
    """The distillation loss of `model` over sequences `rows` of `data` (default: all), per position."""
    total, positions = 0.0, 0
    for row in range(len(data.lengths)) if rows is None else rows:
        length = int(data.lengths[row])
        logits = model(input_ids=torch.from_numpy(data.tokens[row:row + 1, :length]).long()).logits[0]
        ids = torch.from_numpy(data.topk_ids[row, :length]).long()
        logprobs = torch.from_numpy(data.topk_logprobs[row, :length].astype(np.float32))
        total += float(distill_loss(logits, ids, logprobs)) * length
        positions += length
    return total / max(1, positions)


class DraftTrainer:
    """AdamW on the student's decoder layers and final norm; the data order and learning rate
    are functions of the step, so a run resumed from a checkpoint repeats an uninterrupted one."""

    def __init__(self, student: torch.nn.Module, data: TeacherData, config: DraftTrainConfig):
        self.student, self.data, self.config = student.train(), data, config
        if not config.train_embeddings:
            student.get_input_embeddings().weight.requires_grad_(False)
            student.get_output_embeddings().weight.requires_grad_(False)
        self.trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=config.lr, betas=(0.9, 0.95),
                                           weight_decay=config.weight_decay)
        fast = pick_dtype(torch.device("cpu")) == torch.bfloat16
        self.autocast = fast if config.student_bf16 is None else config.student_bf16
        self.step = 0
        self.losses: list[float] = []

    def restore(self, state: TrainState) -> None:
        missing = set(self.trainable) - set(state.model)
        if missing or state.step > self.config.steps:
            raise CheckpointError(f"the checkpoint does not fit this student (missing {sorted(missing)[:3]})")
        with torch.no_grad():
            for name, tensor in state.model.items():
                self.trainable[name].copy_(tensor)
        self.optimizer.load_state_dict(state.optimizer)
        self.step, self.losses = state.step, list(state.losses)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step; the loss and the number of positions trained on."""
        rows = batch_rows(self.step, self.config.batch_size, len(self.data.lengths), self.config.seed)
        lengths = self.data.lengths[rows]
        width = int(lengths.max())
        tokens = torch.from_numpy(self.data.tokens[rows, :width]).long()
        valid = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])  # [batch, width]
        ids = torch.from_numpy(self.data.topk_ids[rows, :width]).long()[valid]
        logprobs = torch.from_numpy(self.data.topk_logprobs[rows, :width].astype(np.float32))[valid]
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config.lr, self.config.warmup_steps, self.config.steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            body = getattr(self.student, self.student.base_model_prefix)  # the decoder without its head
            hidden = body(input_ids=tokens).last_hidden_state[valid]  # [positions, hidden]
            logits = self.student.lm_head(hidden)
        loss = distill_loss(logits, ids, logprobs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), 1.0)
        self.optimizer.step()
        self.step += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1], int(valid.sum())

    def run(self, checkpoint_path: Path, settings: str, progress: bool = True, stop_at: int | None = None) -> None:
        """Train up to `config.steps` (or `stop_at`), checkpointing every `checkpoint_every` steps and
        where it stops."""
        from tqdm.auto import tqdm

        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, desc="distilling", unit="step", disable=not progress)
        started, seen = time.perf_counter(), 0
        end = config.steps if stop_at is None else min(stop_at, config.steps)
        while self.step < end:
            loss, positions = self.train_step()
            seen += positions
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{seen / (time.perf_counter() - started):.0f}")
            if self.step % config.checkpoint_every == 0 or self.step == end:
                self.save(checkpoint_path, settings)
        bar.close()

    def save(self, path: Path, settings: str) -> None:
        model = {name: p.detach().clone() for name, p in self.trainable.items()}
        save_checkpoint(path, TrainState(self.step, model, self.optimizer.state_dict(), settings, self.losses))


def export_draft(student: torch.nn.Module, target: LoadedModel, out_dir: Path, layers: tuple[int, ...],
                 config: DraftTrainConfig, result: DraftTrainResult) -> None:
    """Write the student as an HF model directory with the target's tokenizer; the metadata file
    goes last, so a directory that has it holds a complete model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METADATA_FILE).unlink(missing_ok=True)
    staging = out_dir / "training" / "export"
    shutil.rmtree(staging, ignore_errors=True)
    student.eval()
    student.generation_config = target.model.generation_config
    student.save_pretrained(staging)
    target.tokenizer.save_pretrained(staging)
    for item in staging.iterdir():
        item.replace(out_dir / item.name)
    shutil.rmtree(staging, ignore_errors=True)
    metadata = {
        "target": target.name, "target_identity": target.identity,
        "tokenizer_fingerprint": target.tokenizer_fingerprint, "layers": list(layers),
        "steps": result.steps, "final_loss": result.final_loss, "first_loss": result.first_loss,
        "num_sequences": result.num_sequences, "num_tokens": result.num_tokens, "wall_s": result.wall_s,
        "config": json.loads(json.dumps(asdict(config), default=str)),
    }
    tmp = out_dir / f".{METADATA_FILE}.tmp"
    tmp.write_text(json.dumps(metadata, indent=1))
    tmp.replace(out_dir / METADATA_FILE)
