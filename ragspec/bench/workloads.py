"""Benchmark workloads: named sets of chat requests read from the shared data directory.

Names:
  spec_bench:<category>   Spec-Bench question.jsonl, first turn of each question in the category
  mt_redundant            MT-Redundant: turn 1 is answered (untimed), turn 2 is measured
  longdoc:<set>           L-Eval long-document QA (quality, scientific_qa, financial_qa, ...):
                          one document (truncated by tokens) + its first question; the request
                          keeps both, so the `ragspec` method's RAPID drafter can read the chunks of
                          the document retrieved for the question (`--min-document-tokens` keeps
                          only documents at least that long after the cut)
  jsonl:<path>            any JSONL with `turns` (first turn), `input` + `instructions`, or `prompt`
  rag:spec_bench          Spec-Bench `rag`: the five passages of every selected question form one
                          index; each request asks only the question, with the top-k chunks retrieved
  rag:longdoc:<set>       L-Eval: the whole documents form one index; each request asks a document's
                          first question with the top-k chunks (the datastore drafter sees all)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from ragspec.errors import ConfigError

SPEC_BENCH_CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
    "translation", "summarization", "qa", "math_reasoning", "rag",
)
LONGDOC_SETS = ("quality", "scientific_qa", "financial_qa")
# rag:spec_bench asks the spec_bench:rag questions over the same passages (retrieved instead of
# pasted), so it takes that workload's place in the default set at about the same cost.
DEFAULT_WORKLOADS = (
    "spec_bench:summarization", "rag:spec_bench", "spec_bench:writing",
    "spec_bench:translation", "mt_redundant", "longdoc:quality",
)
FULL_WORKLOADS = (
    *(f"spec_bench:{c}" for c in SPEC_BENCH_CATEGORIES),
    "mt_redundant",
    *(f"longdoc:{s}" for s in LONGDOC_SETS),
    "rag:spec_bench",
    *(f"rag:longdoc:{s}" for s in LONGDOC_SETS),
)
RAG_K = 5  # chunks retrieved into each RAG prompt
CHARS_PER_TOKEN = 4  # fallback document truncation when no tokenizer is given
PROMPT_OVERHEAD_TOKENS = 64  # chat template + instruction words around a long document

Truncate = Callable[[str, int], str]  # (text, max_tokens) -> text of at most max_tokens tokens


@dataclass(frozen=True)
class Request:
    """One benchmark prompt. Every user turn but the last is answered first, untimed."""

    request_id: str
    user_turns: tuple[str, ...]
    document: str | None = None  # a long-document request's document (as cut) ...
    question: str | None = None  # ... and its question (the RAPID drafter retrieves chunks for it)

    def __post_init__(self) -> None:
        if not self.user_turns or not all(isinstance(t, str) and t for t in self.user_turns):
            raise ConfigError(f"request {self.request_id}: needs at least one non-empty user turn")


@dataclass(frozen=True)
class RagSetup:
    """A retrieval workload: its requests' single turn is the question, asked over an index of `corpus`."""

    corpus: tuple[tuple[str, str], ...]  # (source label, text) documents the index is built from
    k: int = RAG_K
    datastore_scope: str = "retrieved"  # what the `ragspec` method's datastore drafter searches


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[Request, ...]
    rag: RagSetup | None = None


@dataclass(frozen=True)
class DocumentBudget:
    """How many tokens a long document may keep, and how to cut it to that many."""

    max_document_tokens: int = 5500
    max_prompt_tokens: int | None = None  # context length minus max_new_tokens; None: no cap
    truncate: Truncate | None = None  # None: cut at CHARS_PER_TOKEN characters per token
    min_document_tokens: int = 0  # documents shorter than this after the cut are left out
    count_tokens: Callable[[str], int] | None = None  # None: len(text) / CHARS_PER_TOKEN

    def too_short(self, document: str) -> bool:
        if self.min_document_tokens <= 0:
            return False
        tokens = self.count_tokens(document) if self.count_tokens else len(document) // CHARS_PER_TOKEN
        return tokens < self.min_document_tokens

    def cut(self, text: str, question_tokens: int = 0) -> str:
        limit = self.max_document_tokens
        if self.max_prompt_tokens is not None:
            limit = min(limit, self.max_prompt_tokens - PROMPT_OVERHEAD_TOKENS - question_tokens)
        limit = max(1, limit)
        if self.truncate is None:
            return text[: limit * CHARS_PER_TOKEN]
        return self.truncate(text, limit)


def tokenizer_truncate(tokenizer) -> Truncate:
    """A Truncate that cuts by the tokenizer's own tokens (keeps the document's start)."""

    def truncate(text: str, max_tokens: int) -> str:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])

    return truncate


def load_workload(
    name: str, data_dir: str | Path, limit: int | None = None, budget: DocumentBudget | None = None
) -> Workload:
    """Read workload `name` (see the module doc) with at most `limit` requests."""
    data = Path(data_dir)
    budget = budget or DocumentBudget()
    kind, _, arg = name.partition(":")
    if kind == "rag":
        return _load_rag_workload(name, arg, data, limit)
    if kind == "spec_bench" and arg:
        rows = _spec_bench_rows(data / "spec_bench" / "question.jsonl", arg)
        requests = (_turns_request(row, i, first_only=True) for i, row in rows)
    elif kind == "mt_redundant" and not arg:
        rows = enumerate(read_jsonl(data / "mt_redundant" / "question.jsonl"))
        requests = (_turns_request(row, i, first_only=False) for i, row in rows)
    elif kind == "longdoc" and arg:
        rows = enumerate(read_jsonl(data / "longdoc" / f"{arg}.jsonl"))
        requests = _long_enough((_leval_request(row, i, budget) for i, row in rows), budget)
    elif kind == "jsonl" and arg:
        requests = _long_enough((_generic_request(row, i, budget) for i, row in enumerate(read_jsonl(Path(arg)))), budget)
    else:
        raise ConfigError(
            f"unknown workload {name!r}: use spec_bench:<category>, mt_redundant, "
            "longdoc:<quality|scientific_qa|financial_qa>, jsonl:<path>, rag:spec_bench or rag:longdoc:<set>"
        )
    selected = tuple(_take(requests, limit))
    if not selected:
        raise ConfigError(f"workload {name!r} has no requests")
    return Workload(name=name, requests=selected)


def _load_rag_workload(name: str, arg: str, data: Path, limit: int | None) -> Workload:
    kind, _, subset = arg.partition(":")
    if kind == "spec_bench" and not subset:
        rows = list(islice(_spec_bench_rows(data / "spec_bench" / "question.jsonl", "rag"), limit))
        split = [(str(row.get("question_id", i)), split_spec_bench_rag(_first_turn(row, i))) for i, row in rows]
        corpus = tuple((f"q{rid}-p{j}", p) for rid, (passages, _) in split for j, p in enumerate(passages, 1))
        requests = tuple(Request(rid, (question,)) for rid, (_, question) in split)
        return Workload(name, requests, RagSetup(corpus))
    if kind == "longdoc" and subset:
        rows = list(islice(enumerate(read_jsonl(data / "longdoc" / f"{subset}.jsonl")), limit))
        pairs = [(str(i), *_leval_fields(row, i)) for i, row in rows]
        documents = dict.fromkeys(document for _, document, _ in pairs)  # a document asked twice is indexed once
        corpus = tuple((f"{subset}-{j}", document) for j, document in enumerate(documents))
        requests = tuple(Request(rid, (question,)) for rid, _, question in pairs)
        if not requests:
            raise ConfigError(f"workload {name!r} has no requests")
        return Workload(name, requests, RagSetup(corpus, datastore_scope="index"))
    raise ConfigError(
        f"unknown workload {name!r}: use rag:spec_bench or rag:longdoc:<quality|scientific_qa|financial_qa>"
    )


def split_spec_bench_rag(prompt: str) -> tuple[list[str], str]:
    """(passages, question) of a Spec-Bench rag prompt: the passages come one a line before the question."""
    lines = [line.strip() for line in prompt.split("\n") if line.strip()]
    if len(lines) < 2:
        raise ConfigError(f"a Spec-Bench rag prompt needs passages before its question, got {prompt[:80]!r}")
    return lines[:-1], lines[-1]


def _first_turn(row: dict, index: int) -> str:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
        raise ConfigError(f"row {index}: `turns` must be a non-empty list")
    return turns[0]


def read_jsonl(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise ConfigError(f"workload file not found: {path} (pass --data-dir)")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object")
            yield row


def _long_enough(requests: Iterator[Request], budget: DocumentBudget) -> Iterator[Request]:
    """The requests whose document (if they have one) is at least budget.min_document_tokens long."""
    return (r for r in requests if r.document is None or not budget.too_short(r.document))


def _take(requests: Iterator[Request], limit: int | None) -> Iterator[Request]:
    for count, request in enumerate(requests):
        if limit is not None and count >= limit:
            return
        yield request


def _spec_bench_rows(path: Path, category: str) -> Iterator[tuple[int, dict]]:
    found = False
    for index, row in enumerate(read_jsonl(path)):
        if row.get("category") == category:
            found = True
            yield index, row
    if not found:
        raise ConfigError(f"no Spec-Bench questions in category {category!r} in {path}")


def _turns_request(row: dict, index: int, first_only: bool) -> Request:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"row {index}: `turns` must be a non-empty list")
    rid = str(row.get("question_id", index))
    return Request(request_id=rid, user_turns=tuple(turns[:1] if first_only else turns[:2]))


def _leval_fields(row: dict, index: int) -> tuple[str, str]:
    """(document, first question) of an L-Eval row."""
    document, instructions = row.get("input"), row.get("instructions")
    if not isinstance(document, str) or not instructions:
        raise ConfigError(f"row {index}: L-Eval rows need `input` and `instructions`")
    return document, instructions[0] if isinstance(instructions, list) else str(instructions)


def _leval_request(row: dict, index: int, budget: DocumentBudget) -> Request:
    document, question = _leval_fields(row, index)
    extra = len(question) // 2  # generous token estimate for the question
    document = budget.cut(document, extra)
    return Request(str(index), (longdoc_prompt(document, question),), document=document, question=question)


def longdoc_prompt(document: str, question: str) -> str:
    return (
        "Read the document below and answer the question after it.\n\n"
        f"Document:\n{document}\n\nQuestion: {question}\nAnswer:"
    )


def _generic_request(row: dict, index: int, budget: DocumentBudget) -> Request:
    if "turns" in row:
        return _turns_request(row, index, first_only=True)
    if "input" in row and "instructions" in row:
        return _leval_request(row, index, budget)
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return Request(request_id=str(row.get("id", index)), user_turns=(prompt,))
    raise ConfigError(f"row {index}: expected `turns`, `input` + `instructions`, or `prompt`")
