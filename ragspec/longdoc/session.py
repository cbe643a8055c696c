"""Questions over long documents, several in a row, each paying only for its own tokens after the
first.

    >>> session = DocumentSession(engine, [Path("report.pdf")])
    >>> session.ask("What was the revenue?", max_new_tokens=64).text
    >>> for piece in session.stream("And the costs?"): print(piece, end="")

The target reads the whole document: one fixed prompt with the document first and the question
last, so consecutive questions share the document's tokens and the engine's prefix cache gives
the second question the document's KV cache (it prefills only the question). Before each later
question the session puts the document's part back into the cache (`Engine.cache_prefix`): after a
question the cache entry is document + question + answer, which the next question crops to the
document at no cost; if other requests pushed it out, the document is prefilled there once more.
The RAPID drafter reads the question with the document's top-k chunks instead (the request's
`draft_prompt`), so drafting costs the same whatever the document's length. The output is the
target's: greedy answers equal plain decoding of the same full prompt.

A session is one conversation: use it from one thread at a time (the engine itself is thread-safe).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ragspec.engine.engine import Engine, Generation, TextStream
from ragspec.engine.request import GenerationRequest
from ragspec.errors import ConfigError, PromptTooLong
from ragspec.longdoc.read import Document, read_document

INSTRUCTION = "Read the document below and answer the question after it."  # the bench's longdoc wording
_QUESTION_SLOT = "\x00QUESTION\x00"  # marks where the question goes in the rendered template
DocumentLike = Document | str | os.PathLike  # a Document, a text, or a file path


def document_prompt(document: str, question: str) -> str:
    """The user turn the target reads: the instruction, the whole document, then the question (the
    wording of the bench's `longdoc:` workloads, so a session and a bench row ask alike)."""
    return f"{INSTRUCTION}\n\nDocument:\n{document}\n\nQuestion: {question}\nAnswer:"


def joined_text(documents: Sequence[Document]) -> str:
    """One document as it is; several one after another, each under a header with its name."""
    if len(documents) == 1:
        return documents[0].text
    return "\n\n".join(f"[Document {i}: {d.name}]\n{d.text}" for i, d in enumerate(documents, 1))


def as_documents(documents: DocumentLike | Sequence[DocumentLike]) -> list[Document]:
    """Documents from Document objects, texts (str) and file paths (Path / os.PathLike)."""
    items = [documents] if isinstance(documents, (Document, str, os.PathLike)) else list(documents)
    if not items:
        raise ConfigError("a document session needs at least one document")
    found = []
    for number, item in enumerate(items, 1):
        if isinstance(item, Document):
            found.append(item)
        elif isinstance(item, os.PathLike):
            found.append(read_document(item))
        elif isinstance(item, str):
            if not item.strip():
                raise ConfigError(f"document {number} is an empty text")
            found.append(Document(name=f"text {number}", text=item))
        else:
            raise ConfigError(f"a document is a text, a file path or a Document, got {type(item).__name__}")
    return found


@dataclass(frozen=True)
class PromptParts:
    """The rendered target prompt around the question: `head` (chat template, instruction,
    document, "Question: ") + question + `tail` ("Answer:", the assistant turn's opening)."""

    head: str
    tail: str

    def full(self, question: str) -> str:
        return f"{self.head}{question}{self.tail}"


class DocumentSession:
    """Questions about one or more documents, asked one after another over one engine.

    `documents`: texts, file paths (read by `ragspec.longdoc.read`) or Documents. The RAPID
    drafter's draft prompt holds the question with the `chunks` best chunks of the documents
    (default: RapidConfig.chunks from the engine's SpecConfig); the documents are chunked and
    embedded on the first question that drafts with RAPID (cached on disk by checksum).
    """

    def __init__(self, engine: Engine, documents: DocumentLike | Sequence[DocumentLike], *, chunks: int | None = None):
        if not engine.prefix_cache:
            raise ConfigError("a document session keeps the document's KV cache: make the engine with prefix_cache=True")
        self.engine = engine
        self.documents = as_documents(documents)
        self.text = joined_text(self.documents)
        self.parts = self._prompt_parts()
        self.document_tokens = len(engine.encode(self.parts.head))  # the prompt up to the question
        self._check_room(self.document_tokens)
        self.chunks = chunks if chunks is not None else _rapid_config(engine).chunks
        if self.chunks < 1:
            raise ConfigError(f"chunks (retrieved into the draft prompt) must be >= 1, got {self.chunks}")
        self._index = None  # DocumentChunks, made on the first RAPID question
        self.questions_asked = 0

    @classmethod
    def from_files(cls, engine: Engine, paths: Sequence[str | os.PathLike], **options) -> DocumentSession:
        """A session over files given as paths (strings are paths here, not texts)."""
        return cls(engine, [Path(p) for p in paths], **options)

    def _prompt_parts(self) -> PromptParts:
        user = document_prompt(self.text, _QUESTION_SLOT)
        tokenizer = self.engine.tokenizer
        if tokenizer.chat_template:
            user = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        head, slot, tail = user.partition(_QUESTION_SLOT)
        if not slot:
            raise ConfigError(f"the chat template of {self.engine.target.name} dropped the question")
        return PromptParts(head, tail)

    def _check_room(self, tokens: int, question_tokens: int = 0) -> None:
        limit = self.engine.target.context_length
        if tokens + question_tokens + 1 >= limit:  # +1: a question needs at least one token
            names = ", ".join(d.name for d in self.documents)
            what = f"the documents ({names}) take" if len(self.documents) > 1 else f"the document ({names}) takes"
            asked = f" and the question {question_tokens} more" if question_tokens else ""
            raise PromptTooLong(
                f"{what} {tokens} tokens with the prompt around the question{asked}, but "
                f"{self.engine.target.name} holds {limit} tokens of context: ask about a shorter document "
                "(or a part of it)"
            )

    def prompt(self, question: str) -> str:
        """The full prompt the target reads for `question` (chat template applied)."""
        return self.parts.full(_checked_question(question))

    def draft_prompt(self, question: str) -> list[dict]:
        """What the RAPID drafter reads: the question with the `chunks` chunks closest to it."""
        from ragspec.longdoc.prompt import rapid_prompt

        return rapid_prompt(self.index().top_chunks(question, self.chunks), question)

    def index(self):
        """The documents' DocumentChunks (chunked and embedded once; on disk by checksum)."""
        if self._index is None:
            from ragspec.longdoc.store import cached_chunks

            self._index = cached_chunks(self.text, self.engine.tokenizer)
        return self._index

    def request(self, question: str, **options) -> GenerationRequest:
        """The GenerationRequest for `question`; `options`: GenerationRequest fields (max_new_tokens,
        temperature, stop, speculative, ...)."""
        question = _checked_question(question)
        for taken in ("prompt", "draft_prompt", "index", "documents"):
            if taken in options:
                raise ConfigError(f"a document session sets {taken} itself")
        self._check_room(self.document_tokens, len(self.engine.tokenizer(question + self.parts.tail).input_ids))
        draft = self.draft_prompt(question) if self._drafts_with_rapid(options.get("speculative")) else None
        return GenerationRequest(self.prompt(question), draft_prompt=draft, **options)

    def stream(self, question: str, **options) -> TextStream:
        """Stream the answer (see TextStream). Later questions reuse the document's KV cache."""
        request = self.request(question, **options)
        if self.questions_asked:  # the first question prefills the document in its own forward
            self.engine.cache_prefix(self.parts.head)
        self.questions_asked += 1
        return self.engine.stream(request)

    def ask(self, question: str, **options) -> Generation:
        """The whole answer (options: those of `request`)."""
        stream = self.stream(question, **options)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def _drafts_with_rapid(self, speculative: bool | None) -> bool:
        spec = self.engine.spec
        on = spec.enabled if speculative is None else speculative
        return bool(on) and "rapid" in spec.drafters and not self.engine.drafter_factories


def _checked_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ConfigError("a question must be a non-empty text")
    return question.strip()


def _rapid_config(engine: Engine):
    from ragspec.drafting.registry import REGISTRY, config_for

    return config_for(REGISTRY["rapid"], engine.spec.options)
