"""ragspec inside vLLM: `RagspecProposer`, a speculative proposer for vLLM's `custom_class` method.

Importable without torch or transformers (vLLM's environment pins its own): see proposer.py.
"""

from ragspec.vllm.proposer import ProposerSettings, RagspecProposer, best_chain

__all__ = ["ProposerSettings", "RagspecProposer", "best_chain"]
