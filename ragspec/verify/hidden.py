"""The target's final hidden states, kept from its forwards for drafters that read them (EAGLE).

A forward hook on the target's last norm keeps that norm's output (the LM head's input, every
row the forward fed, prefill rows included, though the prefill computes logits for its last row
only). It is installed once per loaded model, only when a drafter asks (`LoadedModel.tap_hidden`);
the verifier takes what its own forward left right after it, so other forwards of the same
modules in between (a layer-skipping view) never mix in.
"""

from __future__ import annotations

import torch

from ragspec.errors import ConfigError


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The last norm of an HF causal LM (model.model.norm in Llama, Qwen2, Mistral, Gemma...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ConfigError(f"{type(model).__name__} has no final norm at model.norm: its hidden states cannot be read")
    return norm


class HiddenTap:
    def __init__(self, model: torch.nn.Module):
        self._latest: torch.Tensor | None = None
        self._handle = final_norm(model).register_forward_hook(self._keep)

    def _keep(self, _module, _args, output) -> None:
        self._latest = output

    def take(self) -> torch.Tensor | None:
        """The latest forward's hidden states [batch, rows, hidden], once."""
        latest, self._latest = self._latest, None
        return latest
