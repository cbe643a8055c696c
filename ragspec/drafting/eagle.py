"""The "eagle" drafter: an EAGLE-style head (eagle_head.py) drafting a dynamic tree.

It reuses the draft-model machinery (model.py): `EagleDraftLM` is a `DraftLM` whose module is the
head, so the block bookkeeping, tree masks and KV cache work as for a draft model, and
`EagleTreeDrafter` is a `ModelTreeDrafter` (EAGLE-2 tree growth, the same cost rule). What
differs is the head's second input, a feature per row:

- a committed row at position j reads the target's real feature f[j - 1], which the verifier
  reports for every committed token (`StepResult.hidden`, via `LoadedModel.tap_hidden`); the
  pending row (block row 0) too, since its previous token is committed;
- a tree row reads the head's own output at its parent row.

After verify only the pending row stays in the head's cache: accepted tree rows were computed
from predicted features, and the next step feeds them again from the target's real ones (one
forward with the new pending token), which is what the head was trained on. A prompt whose start
the verifier takes from its prefix cache (no forward, so no features) gets that start's features
from the engine's `FeatureMemory` of earlier requests; features never reported are zeros.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ragspec import kvcache
from ragspec.drafting.eagle_head import EagleHead, target_rows
from ragspec.drafting.model import DraftCosts, DraftLM, ModelDraftConfig, ModelTreeDrafter
from ragspec.errors import ConfigError
from ragspec.models import LoadedModel
from ragspec.types import StepResult

if TYPE_CHECKING:
    from ragspec.drafting.registry import DraftRequest

HEAD_FILE = "head.safetensors"
METADATA_FILE = "ragspec_eagle.json"  # written last: a directory with it holds a finished head


@dataclass(frozen=True)
class EagleDraftConfig(ModelDraftConfig):
    """The "eagle" drafter's knobs: ModelDraftConfig's, with `model` an EAGLE head directory
    (`ragspec draft train-eagle`) or "auto" (the head trained for this target, trained if missing)."""

    model: str | None = "auto"
    # the head drafts only this many of its most frequent tokens (None: all it was trained on): a
    # smaller projection makes each draft forward cheaper (measured: 8192 of 16384 tokens, 8.5 ->
    # 5.3 ms for one row), losing drafts of the rarer tokens
    vocab: int | None = 8192


class FeatureMemory:
    """The target's features of the last few requests' tokens, shared by an engine's requests: a
    request whose prompt starts like an earlier one (the next turn of a chat, the same system
    prompt) gets the features of that prefix, whose KV the verifier reuses without a forward."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: list[tuple[list[int], torch.Tensor]] = []  # (tokens, features [known, hidden])

    def remember(self, tokens: list[int], features: torch.Tensor) -> None:
        self._entries = [*self._entries[-(self.size - 1):], (list(tokens[: features.shape[0]]), features)]

    def recall(self, prompt_ids: list[int]) -> torch.Tensor | None:
        """Features of the longest prefix of `prompt_ids` (but its last token) an entry holds."""
        best = None
        for tokens, features in self._entries:
            shared = kvcache.common_prefix_length(tokens, prompt_ids[:-1])
            if shared and (best is None or shared > best.shape[0]):
                best = features[:shared]
        return best


class EagleDraftLM(DraftLM):
    """A DraftLM over the head, holding the target's features of the committed tokens and the
    head's own output per block row (see the module docstring for which row reads which)."""

    def __init__(self, head: EagleHead, target: LoadedModel):
        super().__init__(head, head.config, device=target.device, dtype=head.fc.weight.dtype,
                         context_length=target.context_length)
        self.vocab_size = target.vocab_size
        hidden = int(head.config.hidden_size)
        self.features = torch.zeros(0, hidden, dtype=head.fc.weight.dtype, device=target.device)  # [positions, hidden]
        self.known = 0  # features of positions [0, known) were added (zeros where never reported)
        self.block_outputs: list[torch.Tensor] = []  # [block rows] the head's output per block row
        self._last_causal: torch.Tensor | None = None

    @property
    def head(self) -> EagleHead:
        return self.module

    def add_target_features(self, start: int, values: torch.Tensor) -> None:
        """The target's features of positions [start, start + rows)."""
        end = start + values.shape[0]
        if end > self.features.shape[0]:
            grown = self.features.new_zeros(max(end, 2 * self.features.shape[0]), self.features.shape[1])
            grown[: self.features.shape[0]] = self.features
            self.features = grown
        self.features[start:end] = values.to(self.features.dtype)
        self.known = max(self.known, end)

    def open_block(self, tokens):
        logits, fed = super().open_block(tokens)
        self.block_outputs = [self._last_causal]
        return logits, fed

    def commit(self, rows) -> None:
        """Keep only the pending row: accepted tree rows come back from real features next step."""
        super().commit(list(rows)[:1])

    def _run(self, ids, mask, positions, last_only, parent_rows):
        if parent_rows is None:  # committed or pending rows: the target's feature one position back
            before = positions[0] - 1
            known = (before >= 0) & (before < self.features.shape[0])
            feats = self.features.new_zeros(len(ids), self.features.shape[1])
            feats[known] = self.features[before[known]]
        else:
            feats = torch.stack([self.block_outputs[row] for row in parent_rows])
        out = self.head(torch.tensor([ids], device=self.device), feats[None], attention_mask=mask,
                        position_ids=positions, cache=self.cache, use_cache=True)[0]  # [rows, hidden]
        if parent_rows is None:
            self._last_causal = out[-1]
        else:
            self.block_outputs.extend(out)
        rows = out[-1:] if last_only else out
        full = rows.new_full((rows.shape[0], self.vocab_size), float("-inf"), dtype=torch.float32)
        full[:, self.head.vocab_ids] = self.head.logits(rows).float()
        return full


class EagleTreeDrafter(ModelTreeDrafter):
    """A ModelTreeDrafter over an EagleDraftLM that takes in the target's features of each step,
    and leaves them in the engine's FeatureMemory when the request ends."""

    def __init__(self, lm: EagleDraftLM, *args, memory: FeatureMemory | None = None, **kwargs):
        super().__init__(lm, *args, **kwargs)
        self.memory = memory

    def finish_request(self, prompt_ids: list[int], token_ids: list[int]) -> None:
        if self.memory is not None and self.lm.known:
            self.memory.remember([*prompt_ids, *token_ids], self.lm.features[: self.lm.known].clone())

    def observe(self, step: StepResult) -> None:
        hidden = step.hidden
        if hidden is not None:
            values = hidden.values
            if step.tree.num_nodes:  # the pending row and the accepted nodes' rows
                values = values[[0, *(1 + node for node in step.accept.accepted_nodes)]]
            self.lm.add_target_features(hidden.start, values)
        super().observe(step)


# ---- saved heads ------------------------------------------------------------------------------


def save_head(head: EagleHead, target: LoadedModel, out_dir: Path, metadata: dict) -> None:
    """Write the head's own weights and its metadata (last: a directory with it is complete)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METADATA_FILE).unlink(missing_ok=True)
    state = {name: t.detach().contiguous() for name, t in head.state_dict().items()}  # fc, layer, norm, ids
    tmp = out_dir / f".{HEAD_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(out_dir / HEAD_FILE)
    info = {"target": target.name, "target_identity": target.identity,
            "tokenizer_fingerprint": target.tokenizer_fingerprint,
            "hidden_size": int(target.model.config.hidden_size), "vocab_order": "frequency", **metadata}
    tmp = out_dir / f".{METADATA_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(out_dir / METADATA_FILE)


def load_head(path: Path, target: LoadedModel, vocab: int | None = None) -> EagleHead:
    """A saved head on `target` (refused, ConfigError, unless trained on this very target),
    drafting its `vocab` most frequent tokens (None: all)."""
    from safetensors.torch import load_file

    meta_path = Path(path) / METADATA_FILE
    if not meta_path.is_file():
        raise ConfigError(f"{path} holds no finished EAGLE head (no {METADATA_FILE}): train one with "
                          "`ragspec draft train-eagle`")
    meta = json.loads(meta_path.read_text())
    if meta.get("target_identity") != target.identity or meta.get("tokenizer_fingerprint") != target.tokenizer_fingerprint:
        raise ConfigError(f"the EAGLE head in {path} was trained on {meta.get('target')} "
                          f"({meta.get('target_identity')}), not on {target.name} ({target.identity}): "
                          "a head reads its own target's hidden states")
    state = load_file(str(Path(path) / HEAD_FILE))
    if vocab is not None and meta.get("vocab_order") == "frequency":  # older heads: ids in id order, kept whole
        state["vocab_ids"] = state["vocab_ids"][:vocab]
    embedding, lm_rows = target_rows(target.model, state["vocab_ids"])
    head = EagleHead(target.model.config, state["vocab_ids"], embedding, lm_rows)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: the EAGLE head's weights do not fit this target (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return head.to(target.device).eval()


def default_head_dir(target: LoadedModel) -> Path:
    from ragspec.models import cache_dir

    return cache_dir() / "eagle-heads" / f"{target.name}-{target.identity}"


def resolve_head(spec: str, target: LoadedModel) -> Path:
    """A head directory: `spec` itself, or for "auto" this target's (trained here if missing)."""
    if spec != "auto":
        return Path(spec)
    path = default_head_dir(target)
    if not (path / METADATA_FILE).is_file():
        from ragspec.training.eagle import train_eagle

        train_eagle(target, out_dir=path)
    return path


def engine_head(engine, head: str, vocab: int | None = EagleDraftConfig.vocab) -> EagleHead:
    """The head `head` (a folder, or "auto") on `engine`'s target, loaded once per engine."""
    target = engine.target
    if getattr(target, "backend", "transformers") != "transformers":
        raise ConfigError('the "eagle" drafter reads the target\'s hidden states: it needs the transformers backend')
    return engine.shared_state(f"eagle-head:{head}:{vocab}", lambda: load_head(resolve_head(head, target), target, vocab))


def build_eagle_drafter(request: DraftRequest, config: EagleDraftConfig) -> EagleTreeDrafter:
    engine = request.engine
    target = engine.target
    if isinstance(config.model, LoadedModel):
        raise ConfigError('the "eagle" drafter takes a head directory or "auto", not a loaded model')
    head = engine_head(engine, str(config.model), config.vocab)
    target.tap_hidden()
    costs = engine.shared_state(f"eagle-costs:{config.model}", DraftCosts)
    memory = engine.shared_state(f"eagle-features:{config.model}", FeatureMemory)
    lm = EagleDraftLM(head, target)
    recalled = memory.recall(request.prompt_ids)
    if recalled is not None:
        lm.add_target_features(0, recalled)
    return EagleTreeDrafter(lm, "eagle", config, engine.budget, sampling=request.sampling,
                            vocab_size=target.vocab_size, costs=costs, memory=memory)
