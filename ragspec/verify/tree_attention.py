"""Tree attention: which earlier tokens each tree node may see, and where it sits.

The verify input is [pending token, node 0, node 1, ...]. Row 0 is the pending token (depth 0);
row i + 1 is tree node i. Every row sees the whole committed KV cache, then the pending token,
its own ancestors and itself: exactly what it would see if its path were decoded token by token.
"""

from __future__ import annotations

import numpy as np
import torch

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
    parents: np.ndarray, past_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask over [committed cache, verify rows]: 0 = visible, dtype min = hidden.

    Shape [1, 1, 1+n, past_length + 1+n], the 4D form transformers models accept as is.
    """
    visible = torch.as_tensor(ancestor_matrix(parents), device=device)
    rows = visible.shape[0]
    full = torch.ones(rows, past_length + rows, dtype=torch.bool, device=device)
    full[:, past_length:] = visible
    mask = torch.zeros(full.shape, dtype=dtype, device=device)
    mask.masked_fill_(~full, torch.finfo(dtype).min)
    return mask[None, None]
