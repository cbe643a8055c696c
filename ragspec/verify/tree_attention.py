"""Tree attention: which earlier tokens each tree node may see, and where it sits.

The verify input is [pending token, node 0, node 1, ...]. Row 0 is the pending token (depth 0);
row i + 1 is tree node i. Every row sees the whole committed KV cache, then the pending token,
its own ancestors and itself: exactly what it would see if its path were decoded token by token.
In a sliding-window layer (Mistral, Gemma 2/3, Qwen2 with use_sliding_window) a row at position p
sees only keys at positions above p - window, transformers' rule, so those layers get their own mask.
"""

from __future__ import annotations

import numpy as np
import torch

from ragspec.errors import UnsupportedModel
from ragspec.types import ROOT


def node_depths(parents: np.ndarray) -> np.ndarray:
    """Depth of each node, 1 for children of the root. [num_nodes] int64."""
    depths = np.zeros(len(parents), dtype=np.int64)
    for i, parent in enumerate(parents):
        depths[i] = 1 if parent == ROOT else depths[parent] + 1
    return depths


def ancestor_matrix(parents: np.ndarray) -> np.ndarray:
    """visible[i, j]: row i may attend row j, over rows [pending, nodes...]. [1+n, 1+n] bool."""
    n = len(parents)
    visible = np.zeros((n + 1, n + 1), dtype=bool)
    visible[:, 0] = True  # everyone sees the pending token
    for i, parent in enumerate(parents):
        row = i + 1
        if parent != ROOT:
            visible[row] = visible[parent + 1]
        visible[row, row] = True
    visible[0, 0] = True
    return visible


def tree_position_ids(parents: np.ndarray, past_length: int, device: torch.device) -> torch.Tensor:
    """Position id of each verify row: committed length + depth. [1, 1+n] int64."""
    depths = np.concatenate([[0], node_depths(parents)])
    return torch.as_tensor(depths + past_length, device=device).unsqueeze(0)


def tree_attention_mask(
    parents: np.ndarray, past_length: int, dtype: torch.dtype, device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive mask over [committed cache, verify rows]: 0 = visible, dtype min = hidden.

    Shape [1, 1, 1+n, past_length + 1+n], the 4D form transformers models accept as is. With
    `sliding_window` w, a row at position p also hides every key at a position <= p - w.
    """
    return tree_attention_masks({"*": sliding_window}, parents, past_length, dtype, device)


def layer_windows(config) -> dict[str, int | None]:
    """Sliding window of each attention layer type of a transformers `config` (None: full attention).

    Configs with `layer_types` (Qwen2, Gemma 3, ...) name a type per layer; the others use one
    type, "*", windowed when the config sets `sliding_window` (Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return {"*": window}
    return {kind: window if kind == "sliding_attention" else None for kind in set(types)}


def tree_attention_masks(
    windows: dict[str, int | None], parents: np.ndarray, past_length: int, dtype: torch.dtype,
    device: torch.device, positions: torch.Tensor | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The `attention_mask` argument for a verify forward over the `windows` of `layer_windows`:
    one 4D mask (`tree_attention_mask`) when every layer attends alike, else a mask per layer
    type, the mapping transformers models take. `positions`: the rows' `tree_position_ids`,
    if already computed."""
    unknown = set(windows) - {"*", "full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedModel(
            f"tree verification handles full and sliding-window attention layers, not {sorted(unknown)}: "
            "turn speculation off for this model (speculative=False, --no-spec)"
        )
    visible = torch.as_tensor(ancestor_matrix(parents), device=device)
    rows = visible.shape[0]
    full = torch.ones(rows, past_length + rows, dtype=torch.bool, device=device)
    full[:, past_length:] = visible
    if all(window is None for window in windows.values()):
        return _additive(full, dtype)
    row_positions = (tree_position_ids(parents, past_length, device) if positions is None else positions)[0]
    key_positions = torch.cat([torch.arange(past_length, device=device), row_positions])
    behind = row_positions[:, None] - key_positions[None, :]  # [1+n, past + 1+n]

    def mask(window: int | None) -> torch.Tensor:
        return _additive(full if window is None else full & (behind < window), dtype)

    if "*" in windows:
        return mask(windows["*"])
    return {kind: mask(window) for kind, window in windows.items()}


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, rows, keys]: 0 where `visible`, the dtype's minimum elsewhere."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]
