"""Naive iterative RAG (In-Context RALM style) and the pieces RaLMSpec shares with it.

Every `stride` generated tokens the query (the question plus the last `query_tokens` generated
tokens) is embedded and the top-1 passage retrieved; the prompt is

    head  = chat template start + instruction + "Context:\\n"     (same for every question)
    passage tokens                                                   (changes with retrieval)
    tail  = "\\n\\nQuestion: ..." + end of turn + assistant header
    generated tokens so far

and generation continues from there. The passage sits at the start (In-Context RALM), so a new
passage invalidates everything after the head. The head's KV is computed once and copied; the
KV of head + passage + tail is computed once per (passage, question) and copied (a passage met
again, as iterative retrieval often swings back, costs no prefill of its own); a passage change
then re-prefills only the generated tokens, in one forward. While the passage
stays the same the same KV cache just keeps decoding (nothing is re-prefilled), and tokens a
speculative step commits past a stride boundary are kept for the next stride when the passage
stays. Both methods build prompts and segments through `StrideRunner`, so the same inputs take
the same computation in both.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ragspec.config import SamplingConfig
from ragspec.engine.loop import decode_steps
from ragspec.engine.rag import DEFAULT_RAG_TEMPLATE
from ragspec.errors import ConfigError, PromptTooLong
from ragspec.iterative.retriever import RetrievalClock, Retriever
from ragspec.types import SpecStats

_PASSAGE_MARK = "\u0000PASSAGE\u0000"
PASSAGE_PREFIXES = 64  # KV copies of head + passage + tail kept (least recently used dropped)


@dataclass(frozen=True)
class IterativeConfig:
    """Knobs of iterative RAG shared by both methods (the output depends on these only)."""

    stride: int = 4  # generated tokens between two retrievals
    query_tokens: int = 32  # last generated tokens appended to the question to form the query
    max_new_tokens: int = 64
    token_speculation: bool = True  # each stride decodes with the engine's drafters (False: plain)
    template: str = DEFAULT_RAG_TEMPLATE  # {context} (the passage) then {question}

    def __post_init__(self) -> None:
        for name in ("stride", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.query_tokens < 0:
            raise ConfigError(f"query_tokens must be >= 0, got {self.query_tokens}")
        if self.template.find("{context}") < 0 or self.template.find("{question}") < self.template.find("{context}"):
            raise ConfigError("the template needs {context} before {question} (the passage goes first)")


@dataclass
class IterativeResult:
    """One question's iterative generation and where its time went."""

    token_ids: list[int]  # generated, EOS excluded
    text: str
    passages: list[int]  # [strides] the chunk id each stride of the output was generated on
    wall_s: float = 0.0
    clock: RetrievalClock = field(default_factory=RetrievalClock)
    wait_s: float = 0.0  # main thread blocked on an asynchronous verification
    background_search_s: float = 0.0  # FAISS time spent on the verifier thread
    rollbacks: int = 0
    speculated: int = 0  # strides generated on a speculated passage (RaLMSpec)
    speculation_hits: int = 0  # of those, verified correct
    prefills: int = 0  # segments started (a passage change re-prefills)
    resumes: int = 0  # rollbacks that went on decoding a parked segment instead of re-prefilling
    stride_plan: list[int] = field(default_factory=list)  # [batches] strides speculated per verification
    spec: SpecStats = field(default_factory=SpecStats)  # token-level steps over all segments

    @property
    def retrieval_s(self) -> float:
        """Main-thread seconds spent retrieving: embedding, FAISS calls, waiting for the verifier."""
        return self.clock.embed_s + self.clock.search_s + self.wait_s

    @property
    def overlap_s(self) -> float:
        """FAISS seconds hidden behind generation (verifier thread time not waited for)."""
        return max(0.0, self.background_search_s - self.wait_s)


@dataclass(frozen=True)
class PromptLayout:
    head: list[int]  # [head tokens] identical for every question and passage
    tail: list[int]  # [tail tokens] the question and the assistant header

    def prompt(self, passage_ids: list[int], generated: list[int]) -> list[int]:
        return [*self.head, *passage_ids, *self.tail, *generated]


def prompt_layout(tokenizer, question: str, template: str) -> PromptLayout:
    """Split the chat-formatted prompt around the passage; each side tokenized on its own."""
    content = template.replace("{context}", _PASSAGE_MARK).replace("{question}", question)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = content + "\n\nAnswer:"
    before, after = text.split(_PASSAGE_MARK)
    return PromptLayout(list(tokenizer(before, add_special_tokens=False).input_ids),
                        list(tokenizer(after, add_special_tokens=False).input_ids))


class Segment:
    """Greedy generation continuing one prompt (one passage): a decode loop and the tokens it
    committed past the last stride boundary it was asked for."""

    def __init__(self, passage: int, steps, start: int):
        self.passage = passage
        self.position = start  # generated tokens (of the whole answer) this segment has handed out
        self._steps = steps
        self._ahead: list[int] = []  # committed by the last step, not handed out yet
        self.exhausted = False  # the context window is full

    def take(self, count: int) -> list[int]:
        """The next `count` tokens (fewer only when the context window fills)."""
        while len(self._ahead) < count:
            step = next(self._steps, None)
            if step is None:
                self.exhausted = True
                break
            self._ahead.extend(step[0])
        out, self._ahead = self._ahead[:count], self._ahead[count:]
        self.position += len(out)
        return out

    def close(self) -> None:
        self._steps.close()


class StrideRunner:
    """Builds prompts and segments for one engine and retriever; both methods go through it."""

    def __init__(self, engine, retriever: Retriever, config: IterativeConfig):
        self.engine = engine
        self.retriever = retriever
        self.config = config
        self._head_prefix = None  # KVPrefix of the head, copied into every segment
        self._passage_prefixes: OrderedDict[tuple, object] = OrderedDict()  # (passage, tail) -> KVPrefix
        self._passage_ids: dict[int, list[int]] = {}

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def start_request(self) -> None:
        """Forget the passage KV of the previous request (kept per request: the same question
        asked again, e.g. by the other method, starts as cold as the first time)."""
        self._passage_prefixes.clear()

    def query(self, question: str, generated: list[int]) -> str:
        recent = generated[-self.config.query_tokens:] if self.config.query_tokens else []
        tail = self.tokenizer.decode(recent, skip_special_tokens=True) if recent else ""
        return f"{question}\n{tail}" if tail else question

    def passage_ids(self, chunk_id: int) -> list[int]:
        if chunk_id not in self._passage_ids:
            text = self.retriever.text(chunk_id)
            self._passage_ids[chunk_id] = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return self._passage_ids[chunk_id]

    def segment(self, layout: PromptLayout, passage: int, generated: list[int], result: IterativeResult) -> Segment:
        """A decode loop over head + passage + tail + generated: the KV of head + passage + tail is
        copied in (computed once per passage and question), the generated tokens are prefilled on
        the segment's first step."""
        prompt_ids = layout.prompt(self.passage_ids(passage), generated)
        limit = self.engine.target.context_length
        if len(prompt_ids) >= limit:
            raise PromptTooLong(f"iterative RAG prompt of {len(prompt_ids)} tokens does not fit in {limit}")
        verifier = self._new_verifier(self._passage_prefix(layout, passage))
        use_spec = self.config.token_speculation and self.engine.spec.enabled
        drafters = self._drafters(prompt_ids) if use_spec else []
        steps = decode_steps(verifier, prompt_ids, drafters=drafters, budget=self.engine.budget() if drafters else None,
                             sampling=SamplingConfig(), stats=result.spec,
                             min_draft_prob=self.engine.spec.min_draft_prob)
        result.prefills += 1
        return Segment(passage, steps, len(generated))

    def append(self, generated: list[int], new: list[int]) -> tuple[list[int], bool]:
        """`generated` + `new` cut before EOS and at max_new_tokens; and whether the answer ended."""
        eos = self.engine.target.eos_token_ids
        cut = next((i for i, token in enumerate(new) if token in eos), None)
        out = [*generated, *(new if cut is None else new[:cut])][: self.config.max_new_tokens]
        return out, cut is not None or len(out) >= self.config.max_new_tokens

    def stride_tokens(self, generated: list[int]) -> int:
        """Tokens up to the next stride boundary (or the token limit)."""
        to_boundary = self.config.stride - len(generated) % self.config.stride
        return min(to_boundary, self.config.max_new_tokens - len(generated))

    def _passage_prefix(self, layout: PromptLayout, passage: int):
        """A copy of the KV of head + passage + tail. Always computed the same way (the head's
        copied KV, then passage + tail in one forward), so a cached copy holds exactly the values
        a recomputation would: which passages a method visited before cannot change its numbers."""
        key = (passage, tuple(layout.tail))
        if key not in self._passage_prefixes:
            rows = layout.prompt(self.passage_ids(passage), [])
            verifier = self._new_verifier(self._head(layout.head))
            verifier.prefill([*rows, rows[-1]])  # every token but the last is fed: exactly `rows`
            self._passage_prefixes[key] = verifier.export_prefix()
            while len(self._passage_prefixes) > PASSAGE_PREFIXES:
                self._passage_prefixes.popitem(last=False)
        self._passage_prefixes.move_to_end(key)
        prefix = self._passage_prefixes[key]
        return prefix.head(len(prefix.token_ids))

    def _head(self, head: list[int]):
        if self._head_prefix is None or self._head_prefix.token_ids != head:
            verifier = self._new_verifier(None)
            verifier.prefill([*head, head[-1]])  # every token but the last fed: the head's rows
            self._head_prefix = verifier.export_prefix()
        return self._head_prefix.head(len(head))

    def _new_verifier(self, prefix):
        make = getattr(self.engine.target, "new_verifier", None)  # a backend-aware target
        if make is not None:
            return make(prefix)
        from ragspec.verify import TreeVerifier

        return TreeVerifier(self.engine.target, prefix)

    def _drafters(self, prompt_ids: list[int]):
        from ragspec.drafting.registry import DraftRequest, build_drafters

        request = DraftRequest(self.engine, prompt_ids, SamplingConfig())
        return build_drafters(self.engine.spec.drafters, request, self.engine.spec.options)


def finish(runner: StrideRunner, result: IterativeResult, generated: list[int], start: float) -> IterativeResult:
    result.token_ids = list(generated)
    result.text = runner.tokenizer.decode(generated, skip_special_tokens=True)
    result.wall_s = time.perf_counter() - start
    return result


def retrieve_top1(runner: StrideRunner, question: str, generated: list[int], clock: RetrievalClock) -> int:
    """The naive retrieval of one stride: embed the query, one FAISS call, top-1."""
    vector = runner.retriever.embed(runner.query(question, generated), clock)
    _, ids, seconds = runner.retriever.search(vector[None], 1)
    clock.search_s += seconds
    clock.calls += 1
    clock.queries += 1
    clock.per_call_s.append(seconds)
    return int(ids[0, 0])


def generate_naive(runner: StrideRunner, question: str) -> IterativeResult:
    """Retrieve before every stride, re-prefill when the passage changes, decode `stride` tokens."""
    start = time.perf_counter()
    runner.start_request()
    layout = prompt_layout(runner.tokenizer, question, runner.config.template)
    result = IterativeResult([], "", [])
    generated, done, segment = [], False, None
    try:
        while not done:
            passage = retrieve_top1(runner, question, generated, result.clock)
            if segment is None or segment.passage != passage:
                if segment is not None:
                    segment.close()
                segment = runner.segment(layout, passage, generated, result)
            result.passages.append(passage)
            generated, done = runner.append(generated, segment.take(runner.stride_tokens(generated)))
            done = done or segment.exhausted
    finally:
        if segment is not None:
            segment.close()
    return finish(runner, result, generated, start)
