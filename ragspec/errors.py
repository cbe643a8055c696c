"""Errors ragspec raises. Each message names the thing at fault and, where there is one, the fix."""


class RagspecError(Exception):
    """Base class: the CLI prints these as a one-line `Error: ...` and exits non-zero."""


class ModelNotFound(RagspecError):
    """A model path that does not exist or holds no loadable model."""


class UnsupportedModel(RagspecError):
    """A model ragspec cannot drive (no causal LM head, no KV cache, ...)."""


class PromptTooLong(RagspecError):
    """The prompt leaves no room to generate inside the model's context window."""


class ConfigError(RagspecError):
    """An invalid configuration value."""


class IndexNotFound(RagspecError):
    """An index name or directory that does not exist."""


class IndexCorrupt(RagspecError):
    """An index whose files are missing, truncated or fail their checksums."""


class TokenizerMismatch(RagspecError):
    """An index built with another tokenizer than the model in use."""


class EmptyCorpus(RagspecError):
    """An index build that found no text to index."""


class IndexVersionMismatch(IndexCorrupt):
    """An index written in another on-disk format version than this ragspec reads."""


class CorpusNotFound(RagspecError):
    """A document path given to an index build that does not exist."""


class DocumentUnreadable(RagspecError):
    """A document given to read (`ragspec ask --doc`, DocumentSession) that is missing, empty, of
    an unsupported type, damaged, or holds no text (an image-only PDF)."""
