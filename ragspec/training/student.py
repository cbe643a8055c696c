"""The draft model's starting point: the target with most decoder layers removed.

The student is an ordinary model of the target's own class and config, with `len(layers)` decoder
layers copied from the chosen target layers, and the target's embedding, final norm and LM head
(tied, like the target's, when the target ties them). Starting from the target's own layers, the
first ones and the last, the student already predicts the target's next token some of the time
before any training, and it keeps the target's tokenizer, so it drafts for the target directly.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch

from ragspec.errors import ConfigError

_LAYER_NAME = re.compile(r"(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)\.(?P<rest>.*)")


def default_layers(num_target_layers: int, num_layers: int) -> tuple[int, ...]:
    """The first `num_layers - 1` target layers and the last one."""
    if not 1 <= num_layers <= num_target_layers:
        raise ConfigError(f"a draft model takes 1 to {num_target_layers} layers of this target, not {num_layers}")
    if num_layers == 1:
        return (0,)
    return (*range(num_layers - 1), num_target_layers - 1)


def check_layers(layers: Sequence[int], num_target_layers: int) -> tuple[int, ...]:
    layers = tuple(int(i) for i in layers)
    if not layers or any(not 0 <= i < num_target_layers for i in layers):
        raise ConfigError(f"draft layers {list(layers)}: each must be a target layer 0..{num_target_layers - 1}")
    return layers


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer stack of an HF causal LM (model.model.layers in Llama, Qwen2, Mistral...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return layers


def plain_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` with plain nn.Linear layers and SDPA attention in `dtype`, for batched
    forwards and generation (ragspec's CPU kernels are tuned for one request's decode steps)."""
    from ragspec.kernels.linear import unpacked

    with unpacked(model):
        plain = copy.deepcopy(model)
    plain = plain.to(dtype).eval()
    if plain.config._attn_implementation != "sdpa":
        plain.set_attn_implementation("sdpa")
    return plain


def build_student(target: torch.nn.Module, layers: Sequence[int]) -> torch.nn.Module:
    """A float32 model of the target's class with the target layers `layers` (in that order) and
    every other weight (embedding, norm, head) copied from the target."""
    from transformers import AutoModelForCausalLM

    target_layers = decoder_layers(target)
    layers = check_layers(layers, len(target_layers))
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds follow their layer
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    state = renumbered_layers(plain_state(target), layers)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"the target's weights do not fit a pruned copy: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        student.tie_weights()
    return student


def renumbered_layers(state: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """`state` with target layer `layers[i]` renamed to layer i and every other layer dropped."""
    out = {}
    for name, tensor in state.items():
        match = _LAYER_NAME.match(name)
        if match is None:
            out[name] = tensor
            continue
        for position, index in enumerate(layers):
            if index == int(match["index"]):
                out[f"{match['prefix']}{position}.{match['rest']}"] = tensor
    return out


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights in float32 under their plain names (ragspec's packed linears unpacked)."""
    from ragspec.kernels.linear import unpacked

    with unpacked(model):
        return {name: tensor.detach().float().clone() for name, tensor in model.state_dict().items()}
