"""The teacher signal: the target's answers to the training prompts and its top-k next-token
log-probabilities at every position, computed once and cached on disk as .npz shards.

Shards are numpy files (never pickles), each written atomically under a folder named by a hash
of everything that decides its contents (target, tokenizer, data plan, seed, k): a resumed or
repeated run with the same settings reads them back instead of running the target again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ragspec.errors import ConfigError

PAD_ID = 0  # fills sequences shorter than the batch's longest; those positions are masked out


@dataclass(frozen=True)
class TeacherData:
    """Every training sequence with the target's top-k log-probabilities after each position."""

    tokens: np.ndarray  # [num_seqs, seq_len] int32, PAD_ID after `lengths`
    lengths: np.ndarray  # [num_seqs] int32
    topk_ids: np.ndarray  # [num_seqs, seq_len, k] int32, the teacher's k likeliest next tokens
    topk_logprobs: np.ndarray  # [num_seqs, seq_len, k] float16, their log-probabilities

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @staticmethod
    def concat(parts: Sequence[TeacherData]) -> TeacherData:
        return TeacherData(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                             ("tokens", "lengths", "topk_ids", "topk_logprobs")))


class ShardCache:
    """Numbered .npz shards in one folder; a shard present on disk is never computed again."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, name: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        path = self.folder / f"{name}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    return {key: stored[key] for key in stored.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):
                path.unlink(missing_ok=True)  # a damaged shard (a killed write): compute it again
        arrays = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}-", suffix=".npz")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
        return arrays


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     eos_ids: set[int]) -> list[list[int]]:
    """Greedy answers of `model` to a batch of tokenized prompts (left-padded in one batch); each
    answer ends at its first EOS, which it keeps (drafts learn to predict the end too)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=PAD_ID, eos_token_id=sorted(eos_ids), top_p=None, top_k=None, temperature=None)
    answers = []
    for row in out[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        answers.append(row[: ends[0] + 1] if ends else row)
    return answers


@torch.inference_mode()
def teacher_topk(model, sequences: list[list[int]], seq_len: int, k: int) -> dict[str, np.ndarray]:
    """One target forward over right-padded `sequences` (causal: the padding changes nothing before
    it): the top-k log-probabilities after every position, as TeacherData's arrays."""
    n = len(sequences)
    tokens = np.full((n, seq_len), PAD_ID, dtype=np.int32)
    lengths = np.array([min(len(s), seq_len) for s in sequences], dtype=np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, : lengths[row]] = seq[:seq_len]
    width = int(lengths.max())
    logits = model(input_ids=torch.from_numpy(tokens[:, :width]).long()).logits  # [n, width, vocab]
    topk_ids = np.zeros((n, seq_len, k), dtype=np.int32)
    topk_logprobs = np.full((n, seq_len, k), -np.inf, dtype=np.float16)
    for row in range(n):  # one row at a time: the float32 log-softmax of a batch is large
        logprobs = torch.log_softmax(logits[row].float(), dim=-1)
        values, indices = logprobs.topk(k, dim=-1)
        topk_ids[row, :width] = indices.numpy()
        topk_logprobs[row, :width] = values.clamp(min=-60.0).numpy().astype(np.float16)
    return {"tokens": tokens, "lengths": lengths, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs}


def as_teacher_data(arrays: dict[str, np.ndarray], k: int) -> TeacherData:
    data = TeacherData(arrays["tokens"], arrays["lengths"], arrays["topk_ids"], arrays["topk_logprobs"])
    if data.topk_ids.shape[-1] != k or data.tokens.shape != data.topk_ids.shape[:2]:
        raise ConfigError("a teacher cache shard does not match the settings: delete the draft-data folder")
    return data
