"""What the decoding loop needs from a target model, whichever engine runs it.

Two backends implement it: `transformers` (ragspec.models.LoadedModel + ragspec.verify.TreeVerifier,
torch with ragspec's CPU kernels) and `llamacpp` (ragspec.backends.llamacpp: the GGUF file's own
quantised weights through llama.cpp). Drafters, the node budget, acceptance and the engine talk to
these two protocols only; drafters that run the target's torch modules themselves (layer skipping)
need the transformers backend and say so.

A verify step feeds [pending token, node 0, node 1, ...] at positions committed length + depth,
every row seeing the committed tokens, the pending token and its own ancestors (tree attention),
and returns the logits of every row; `commit` then keeps the accepted path's KV only.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ragspec.types import AcceptResult, DraftTree, VerifyOutput
from ragspec.verify.verifier import KVPrefix


@runtime_checkable
class TargetVerifier(Protocol):
    """Owns one request's KV state on the target.

    Invariant between steps: the KV holds every committed token except the pending one."""

    target: "TargetBackend"

    @property
    def past_length(self) -> int: ...  # committed tokens whose KV is held

    def prefill(self, token_ids: list[int]) -> None:
        """Feed every token but the last, which becomes the first pending token."""

    def prefill_and_verify(self, token_ids: list[int]) -> tuple[VerifyOutput, int]:
        """`prefill` plus a verify of the last token with an empty tree, in one forward; also the
        number of leading tokens whose KV came from a reused prefix."""

    def verify(self, pending_token: int, tree: DraftTree) -> VerifyOutput:
        """Logits of the pending token and of every tree node: [1 + num_nodes, vocab] float32."""

    def commit(self, accept: AcceptResult) -> None:
        """Keep the pending token's and the accepted nodes' KV, drop the other rows."""

    def discard(self) -> None:
        """Drop KV rows past the committed tokens (an unused verify)."""

    def export_prefix(self) -> KVPrefix:
        """The committed tokens and their KV, for the next request to start from (prefix reuse)."""


@runtime_checkable
class TargetBackend(Protocol):
    """A loaded target model: its tokenizer (the transformers tokenizer interface), its limits,
    and verifiers over it."""

    backend: str  # "transformers" or "llamacpp"
    name: str
    tokenizer: object
    max_tree_nodes: int | None  # most nodes a verify takes with exact logits (None: SpecConfig.max_nodes)

    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> set[int]: ...

    @property
    def tokenizer_fingerprint(self) -> str: ...

    @property
    def identity(self) -> str: ...  # which model, for state learned from its outputs

    @property
    def fingerprint(self) -> str: ...  # model + backend + kernels/threads: keys the latency curve

    def new_verifier(self, prefix: KVPrefix | None = None) -> TargetVerifier:
        """A verifier for one request, starting from `prefix` when it can (else cold)."""
