"""An EAGLE-style draft head: one decoder layer that reads the target's own last hidden states.

The target's final hidden state at position j (after its last norm, the input of its LM head)
already says much about token j + 2, not only j + 1. The head takes that feature f[j - 1] and the
embedding of the token t[j] the target then produced, and predicts the target's next feature
f[j]; the target's own LM head (restricted to a frequent-token subset, FR-Spec style, so a draft
forward stays cheap next to the target's) turns it into draft logits for t[j + 1]. Deeper drafts
feed the head's own predicted feature back in. The head attends over its own KV cache of earlier
rows, like any causal LM.

Row j of the head: input (feature f[j - 1] (zeros at j = 0), token t[j]) -> predicted f[j] ->
logits for t[j + 1]: row j predicts what follows token j, as a causal LM's row j does, so the
head drafts through the same `DraftLM` block bookkeeping as a draft model.

The head is a module of the target's own architecture (its decoder layer class, rotary
embedding and final norm, from a one-layer copy of the target's config), so attention masks,
positions and the KV cache work as they do for the target.
"""

from __future__ import annotations

import copy

import torch



def head_config(target_config):
    """The target's config cut to one decoder layer, with a vocabulary of one (the head reads the
    target's embedding and projects with the target's LM head rows)."""
    config = copy.deepcopy(target_config)
    config.num_hidden_layers = 1
    config.vocab_size = 1
    config.pad_token_id = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"]
    config.tie_word_embeddings = False
    return config


class EagleHead(torch.nn.Module):
    """fc(concat(embedding(t[j]), f[j - 1])) -> one decoder layer -> norm: the predicted f[j].

    `embedding` [vocab, hidden] and `lm_rows` [subset, hidden] are the target's (frozen, not
    saved with the head); `vocab_ids` [subset] maps the head's logits to target token ids."""

    def __init__(self, target_config, vocab_ids: torch.Tensor, embedding: torch.Tensor, lm_rows: torch.Tensor):
        super().__init__()
        from transformers import AutoModel

        hidden = int(target_config.hidden_size)
        self.config = head_config(target_config)
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=True)
        self.body = AutoModel.from_config(self.config, dtype=torch.float32, attn_implementation="sdpa")
        self.body.embed_tokens = None  # rows come in as inputs_embeds (fc's output)
        self.register_buffer("vocab_ids", vocab_ids.long(), persistent=True)
        self.register_buffer("embedding", embedding, persistent=False)
        self.register_buffer("lm_rows", lm_rows, persistent=False)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, **body_arguments) -> torch.Tensor:
        """input_ids [b, m], features [b, m, hidden] (f[j - 1] for each row) -> predicted
        features [b, m, hidden]. `body_arguments`: attention_mask, position_ids, cache, use_cache."""
        embedded = torch.nn.functional.embedding(input_ids, self.embedding)
        x = self.fc(torch.cat([embedded.to(self.fc.weight.dtype), features.to(self.fc.weight.dtype)], dim=-1))
        return self.body(inputs_embeds=x, **body_arguments).last_hidden_state

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft logits over the subset [..., subset] (target ids: `vocab_ids`)."""
        return features.to(self.lm_rows.dtype) @ self.lm_rows.T


def target_rows(model: torch.nn.Module, vocab_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input embedding [vocab, hidden] and LM head rows of `vocab_ids` [subset, hidden],
    detached, in the target's dtype (ragspec's packed linears unpacked for the copy)."""
    from ragspec.kernels.linear import unpacked

    with unpacked(model):
        lm_rows = model.get_output_embeddings().weight.detach()[vocab_ids.long()].clone()
    return model.get_input_embeddings().weight.detach(), lm_rows  # shared: embeddings are never packed
