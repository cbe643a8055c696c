"""Train an EAGLE-style draft head (ragspec.drafting.eagle_head) for a target, on this CPU.

Data: the same sequences as the draft-model distillation (the target's own answers to training
prompts, and text windows; ragspec.training.draft.prepare_teacher_data, cached), with the
target's final hidden states computed here in float32 (cached as .npz shards too).

Training unrolls the head the way it drafts ("training-time test", EAGLE-3): block 0 reads the
target's real features; block k reads block k - 1's predicted features one position back and
attends to the real rows before its chain plus its chain's earlier blocks, so a depth-k draft
is trained in exactly the context it meets when drafting. Loss per block: smooth L1 between
predicted and real features, plus cross-entropy against the target's top-k next-token
distribution restricted to the head's token subset.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ragspec import kvcache
from ragspec.drafting.eagle_head import EagleHead, target_rows
from ragspec.models import LoadedModel, cache_dir
from ragspec.training.checkpoint import TrainState
from ragspec.training.schedule import batch_rows, learning_rate
from ragspec.training.teacher import ShardCache, TeacherData, cache_key

CHECKPOINT_EVERY = 50  # steps


@dataclass(frozen=True)
class EagleTrainConfig:
    """One head's training run; the defaults are the measured run (README: EAGLE head)."""

    vocab_size: int = 16384  # draft vocabulary: the most frequent tokens (FR-Spec)
    depth: int = 2  # unrolled blocks trained (drafting depths seen in training)
    steps: int = 800
    batch_size: int = 4  # sequences per step
    lr: float = 1e-3
    warmup_steps: int = 30
    feature_weight: float = 1.0  # smooth L1 to the target's hidden states ...
    token_weight: float = 0.2  # ... plus cross-entropy to its next-token distribution (0 / 1: same agreement)
    seed: int = 0
    feature_batch: int = 8


def eagle_data_config(data_dir: Path | None = None):
    """The distillation data a head trains on by default: twice `ragspec draft train`'s prompts
    and windows (measured: 161k tokens; 38k gave 0.20 top-1 agreement, 161k 0.24)."""
    from ragspec.training.data import DataPlan
    from ragspec.training.draft import DEFAULT_DATA_DIR, DraftTrainConfig

    return DraftTrainConfig(data=DataPlan(num_prompts=640, num_text_windows=192), data_dir=data_dir or DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class Features:
    """The target's final hidden state at every position of every training sequence."""

    values: np.ndarray  # [num_seqs, seq_len, hidden] float16


def target_features(target: LoadedModel, data: TeacherData, batch: int, progress: bool = True) -> Features:
    """Float32 target forwards over `data`'s sequences; cached by target and data."""
    from tqdm.auto import tqdm

    from ragspec.training.student import plain_copy

    key = cache_key(target=f"{target.name}-{target.identity}", tokens=int(data.tokens.sum()),
                    shape=list(data.tokens.shape), lengths=int(data.lengths.sum()), batch=batch)
    cache = ShardCache(cache_dir() / "eagle-features" / key)
    model = None
    parts = []
    for number, begin in enumerate(tqdm(range(0, len(data.lengths), batch), desc="target features",
                                        disable=not progress)):
        def compute(begin=begin):
            nonlocal model
            if model is None:
                model = plain_copy(target.model, torch.float32)
            tokens = torch.from_numpy(data.tokens[begin:begin + batch]).long()
            with torch.inference_mode():
                hidden = model.get_decoder()(input_ids=tokens).last_hidden_state
            return {"values": hidden.numpy().astype(np.float16)}
        parts.append(cache.get(f"features-{number:05d}", compute)["values"])
    return Features(np.concatenate(parts))


def frequent_tokens(sequences: list[np.ndarray], size: int, always: set[int]) -> torch.Tensor:
    """`always` (e.g. EOS), then the most frequent other token ids of `sequences`, most frequent
    first, `size` in all: any prefix is a smaller frequent-token subset (EagleDraftConfig.vocab)."""
    counts = collections.Counter()
    for seq in sequences:
        counts.update(np.asarray(seq).tolist())
    first = sorted(always)
    ranked = [token for token, _ in counts.most_common() if token not in always]
    return torch.tensor((first + ranked)[:size], dtype=torch.long)


def unrolled_mask(length: int, depth: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, depth * length, depth * length] over blocks of `length` rows: block 0
    is causal; block k row j sees block 0 rows <= j - k and blocks 1..k at rows j - k + m (its
    chain), never a row before position 0."""
    rows = depth * length
    allowed = torch.zeros(rows, rows, dtype=torch.bool)
    j = torch.arange(length)
    allowed[:length, :length] = j[None, :] <= j[:, None]
    for k in range(1, depth):
        block = slice(k * length, (k + 1) * length)
        allowed[block, :length] = j[None, :] <= (j[:, None] - k)
        for m in range(1, k + 1):
            source = j - k + m  # the chain's block-m row for row j
            valid = source >= 0
            allowed[k * length + j[valid], m * length + source[valid]] = True
    mask = torch.zeros(rows, rows, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def unrolled_forward(head: EagleHead, tokens: torch.Tensor, features: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Predicted features of each block [depth] x [b, length, hidden] (see the module docstring).
    tokens [b, length]; features [b, length, hidden] the target's real ones."""
    b, length, hidden = features.shape
    shifted = torch.cat([features.new_zeros(b, 1, hidden), features[:, :-1]], dim=1)  # f[j - 1]
    positions = torch.arange(length)[None].expand(b, -1)
    mask = unrolled_mask(length, depth, torch.float32)
    cache = kvcache.new_cache(head.config)  # blocks 0..k-1 stay cached while block k runs
    outputs: list[torch.Tensor] = []
    inputs = shifted
    for k in range(depth):
        rows = slice(k * length, (k + 1) * length)
        out = head(tokens, inputs, attention_mask=mask[:, :, rows, : (k + 1) * length], position_ids=positions,
                   cache=cache, use_cache=True)
        outputs.append(out)
        inputs = torch.cat([features.new_zeros(b, 1, hidden), out[:, :-1]], dim=1)  # block k + 1 reads these
    return outputs


def token_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
               subset_index: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's subset logits [P, subset] against the target's top-k
    distribution [P, k] restricted to the subset (renormalized)."""
    index = subset_index[topk_ids]  # [P, k], -1 outside the subset
    probs = topk_logprobs.float().exp() * (index >= 0)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-9)
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, index.clamp(min=0))
    return -(probs * logq).sum(-1).mean()


class EagleTrainer:
    """AdamW on the head's own weights (fc, decoder layer, norm; the target's embedding and LM
    rows are buffers, never trained); the schedule is a function of the step (schedule.py)."""

    def __init__(self, head: EagleHead, data: TeacherData, features: Features, config: EagleTrainConfig):
        self.head, self.data, self.features, self.config = head.train(), data, features, config
        self.params = [p for p in head.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.subset_index = torch.full((int(head.embedding.shape[0]),), -1, dtype=torch.long)
        self.subset_index[head.vocab_ids] = torch.arange(len(head.vocab_ids))
        self.step = 0
        self.losses: list[float] = []

    def trainable(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.head.named_parameters() if p.requires_grad}

    def restore(self, state: TrainState) -> None:
        with torch.no_grad():
            for name, p in self.head.named_parameters():
                if name in state.model:
                    p.copy_(state.model[name])
        self.optimizer.load_state_dict(state.optimizer)
        self.step, self.losses = state.step, list(state.losses)

    def train_step(self) -> float:
        config = self.config
        rows = batch_rows(self.step, self.config.batch_size, len(self.data.lengths), self.config.seed)
        lengths = self.data.lengths[rows]
        width = int(lengths.max())
        tokens = torch.from_numpy(self.data.tokens[rows, :width]).long()
        real = torch.from_numpy(self.features.values[rows, :width].astype(np.float32))
        valid = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
        ids = torch.from_numpy(self.data.topk_ids[rows, :width]).long()[valid]
        logprobs = torch.from_numpy(self.data.topk_logprobs[rows, :width].astype(np.float32))[valid]
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config.lr, self.config.warmup_steps, self.config.steps)
        loss = torch.zeros(())
        for k, predicted in enumerate(unrolled_forward(self.head, tokens, real, config.depth)):
            keep = valid.clone()
            keep[:, :k] = False  # a depth-k chain starts k rows in
            feature = torch.nn.functional.smooth_l1_loss(predicted[keep], real[keep])
            logits = self.head.logits(predicted[keep])
            tokens_loss = token_loss(logits, ids[keep[valid]], logprobs[keep[valid]], self.subset_index)
            loss = loss + config.feature_weight * feature + config.token_weight * tokens_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.step += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]


@torch.inference_mode()
def eagle_hits(head: EagleHead, target_model, item, depth: int) -> np.ndarray:
    """hits [depth, answer tokens] of an eval item (ragspec.training.evaluate.EvalItem): whether a
    depth-(k + 1) draft, in a chain started k tokens earlier, is the target's answer token."""
    sequence = torch.tensor([item.prompt_ids + item.answer_ids])
    real = target_model.get_decoder()(input_ids=sequence).last_hidden_state.float()
    first = len(item.prompt_ids) - 1  # row of the last prompt token: predicts the first answer token
    rows = torch.arange(first, first + len(item.answer_ids))
    hits = np.zeros((depth, len(item.answer_ids)), dtype=bool)
    for k, predicted in enumerate(unrolled_forward(head, sequence, real, depth)):
        drafted = head.vocab_ids[head.logits(predicted[0, rows]).argmax(-1)]
        hits[k] = (drafted == sequence[0, rows + 1]).numpy()
    return hits


@dataclass(frozen=True)
class EagleTrainResult:
    path: Path
    steps: int
    first_loss: float  # mean over the first 10% of steps
    final_loss: float  # mean over the last 10% of steps
    wall_s: float
    num_tokens: int  # training positions
    resumed_from: int
    finished: bool = True  # False: stopped early (stop_after), checkpointed, not saved as a head


def train_eagle(target: LoadedModel, config: EagleTrainConfig = EagleTrainConfig(), out_dir: Path | None = None,
                *, data_config=None, progress: bool = True, resume: bool = True,
                stop_after: int | None = None) -> EagleTrainResult:
    """Train a head for `target` and save it in `out_dir` (default: the "auto" head's folder).
    `data_config`: the DraftTrainConfig whose teacher data to train on (default: `eagle_data_config()`).
    A checkpoint in `out_dir/training/` is resumed when its settings match (`resume`);
    `stop_after`: run at most that many steps now and leave the checkpoint (not finished)."""
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from ragspec.drafting.eagle import default_head_dir, save_head
    from ragspec.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
    from ragspec.training.draft import prepare_teacher_data

    start = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else default_head_dir(target)
    data_config = data_config or eagle_data_config()
    data = prepare_teacher_data(target, data_config, progress=progress)
    features = target_features(target, data, config.feature_batch, progress=progress)
    head = initial_head(target, data, config)
    trainer = EagleTrainer(head, data, features, config)
    settings = json.dumps({"eagle": asdict(config), "data": asdict(data_config),
                            "target": f"{target.name}-{target.identity}"}, sort_keys=True, default=str)
    checkpoint = out_dir / "training" / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        trainer.restore(load_checkpoint(checkpoint, settings))
    resumed_from = trainer.step
    end = config.steps if stop_after is None else min(config.steps, resumed_from + stop_after)
    bar = tqdm(total=config.steps, initial=trainer.step, desc="training EAGLE head", unit="step", disable=not progress)
    while trainer.step < end:
        loss = trainer.train_step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if trainer.step % CHECKPOINT_EVERY == 0 or trainer.step == end:
            save_checkpoint(checkpoint, TrainState(trainer.step, trainer.trainable(), trainer.optimizer.state_dict(),
                                                   settings, trainer.losses))
    bar.close()
    tail = max(1, len(trainer.losses) // 10)
    result = EagleTrainResult(out_dir, trainer.step, float(np.mean(trainer.losses[:tail])),
                              float(np.mean(trainer.losses[-tail:])), time.perf_counter() - start,
                              data.num_tokens, resumed_from, finished=trainer.step >= config.steps)
    if not result.finished:
        return result
    save_head(head.eval(), target, out_dir, {"config": asdict(config), "data": asdict(data_config),
                                             "first_loss": result.first_loss, "final_loss": result.final_loss,
                                             "num_tokens": result.num_tokens, "wall_s": result.wall_s})
    checkpoint.unlink(missing_ok=True)
    return result


def initial_head(target: LoadedModel, data: TeacherData, config: EagleTrainConfig) -> EagleHead:
    """A head whose decoder layer and norm start as the target's last ones (measured: a better
    start than random weights), over the `vocab_size` most frequent tokens of the training data."""
    from ragspec.training.student import decoder_layers, plain_state

    torch.manual_seed(config.seed)
    sequences = [data.tokens[r, : data.lengths[r]] for r in range(len(data.lengths))]
    sequences += [data.topk_ids[r, : data.lengths[r], 0] for r in range(len(data.lengths))]
    vocab_ids = frequent_tokens(sequences, config.vocab_size, target.eos_token_ids)
    embedding, lm_rows = target_rows(target.model, vocab_ids)
    head = EagleHead(target.model.config, vocab_ids, embedding.float(), lm_rows.float())
    last = len(decoder_layers(target.model)) - 1
    state = plain_state(target.model)
    prefix = f"model.layers.{last}."
    head.body.layers[0].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    head.body.norm.load_state_dict({"weight": state["model.norm.weight"]})
    return head
