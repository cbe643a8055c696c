"""Run every method on every workload prompt with one loaded model, then write the report.

>>> from ragspec.bench import BenchOptions, run_benchmark
>>> report = run_benchmark(BenchOptions(workloads=("spec_bench:rag",), limit=2, max_new_tokens=64))
>>> report["workloads"][0]["methods"]["ragspec"]["speedup_vs_ragspec_ar"]

RAG workloads (rag:...) build their index into a temporary home that the run removes; experiments
(options.experiments) run after the workloads, each into report["experiments"].
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ragspec.bench.copy_bound import copy_bounds
from ragspec.bench.divergence import Fp32Judge
from ragspec.bench.experiments import run_experiment
from ragspec.bench.options import BenchOptions
from ragspec.bench.peers import (
    REFERENCE_METHOD,
    LongDocContext,
    Method,
    MethodOutput,
    MethodSetup,
    PreparedRequest,
    Sampling,
    build_methods,
    model_draft_spec,
)
from ragspec.bench.rag import RagRun
from ragspec.bench.report import RunMetadata, WorkloadRun, build_report, write_report
from ragspec.bench.workloads import (
    DocumentBudget,
    Request,
    Workload,
    load_workload,
    tokenizer_truncate,
)
from ragspec.config import SpecConfig
from ragspec.drafting.registry import default_drafters
from ragspec.engine import Engine
from ragspec.engine.budget import measure_latency_curve
from ragspec.errors import ConfigError
from ragspec.models import EMBEDDED_MODEL, LoadedModel, load_model

log = logging.getLogger(__name__)

WARMUP_MESSAGES = ({"role": "user", "content": "Say hello and count from one to five."},)
WARMUP_TOKENS = 8

def run_benchmark(options: BenchOptions, engine: Engine | LoadedModel | None = None,
                  draft: LoadedModel | None = None) -> dict:
    """Benchmark, write JSON + Markdown + plots under options.json_path, return the report.
    `draft`: a loaded draft model (else options.draft_model is loaded, if set)."""
    engine, draft = _as_engine(engine, options, draft)
    workloads = load_workloads(options, engine)
    setup = MethodSetup(options.model, draft, Sampling(options.temperature, options.seed), options.eagle_head)
    methods = build_methods(options.methods, engine, setup)
    if options.warmup:
        warm_up(methods, engine)
    meta, runs = RunMetadata.collect(engine, options), []
    judge = None if meta.dtype == "float32" or options.temperature > 0 else fp32_judge(engine, options)
    with tempfile.TemporaryDirectory(prefix="ragspec-bench-indexes-") as index_home:  # RAG indexes, one a workload
        for workload in workloads:
            run = run_workload(workload, methods, engine, options.max_new_tokens, index_home)
            run = with_llamacpp_comparison(run, methods) if options.temperature == 0 else run
            runs.append(judge_divergences(run, judge) if judge else run)
            # partial report, so an interrupted run keeps its numbers
            write_report(build_report(meta, runs), Path(options.json_path), plots=False)
    experiments = {}
    for name in dict.fromkeys(options.experiments):
        experiments[name.replace("-", "_")] = run_experiment(name, options, engine)
        write_report(build_report(meta, runs, experiments), Path(options.json_path), plots=False)
    report = build_report(meta, runs, experiments)
    write_report(report, Path(options.json_path), plots=options.plots)
    return report


def with_llamacpp_comparison(run: WorkloadRun, methods: Sequence[Method]) -> WorkloadRun:
    """The run with its "llamacpp" entry (ragspec on llama.cpp vs llamacpp-greedy), when it has both."""
    from ragspec.bench.llamacpp_check import ENGINE_METHODS, compare_with_llamacpp

    engine_method = next((m for m in methods if m.name in ENGINE_METHODS), None)
    if engine_method is None:
        return run
    entry = compare_with_llamacpp(run, engine_method.engine.target)
    return dataclasses.replace(run, extra={**run.extra, "llamacpp": entry}) if entry else run


def _as_engine(engine: Engine | LoadedModel | None, options: BenchOptions,
               draft: LoadedModel | None) -> tuple[Engine, LoadedModel | None]:
    """The run's engine and draft model (`draft`, else options.draft_model loaded). With a draft
    model, `ragspec` fuses it with every default drafter (an Engine passed in is used as given)."""
    if isinstance(engine, Engine):
        return engine, draft or load_draft_model(options.draft_model, engine.target)
    target = engine if isinstance(engine, LoadedModel) else _load_target(options)
    draft = draft or load_draft_model(options.draft_model, target)
    spec = model_draft_spec(draft, default_drafters()) if draft is not None else SpecConfig()
    if isinstance(engine, LoadedModel):
        return Engine(engine, spec=spec, persist_state=False), draft
    # A fresh curve, not the cache: a curve profiled while the machine was busy would skew the run.
    log.info("profiling the verify-latency curve")
    curve = measure_latency_curve(target)
    # Learned drafter state starts cold and stays off disk, so runs do not feed each other.
    return Engine(target, spec=spec, latency_curve=curve, persist_state=False), draft


def _load_target(options: BenchOptions) -> LoadedModel:
    log.info("loading model %s (dtype %s)", options.model or "embedded", options.dtype or "auto")
    return load_model(options.model, dtype=options.dtype)


def load_draft_model(path: str | None, target: LoadedModel) -> LoadedModel | None:
    """The draft model at `path` ("auto": the one trained here for the target, trained first if
    missing), in the target's dtype on its device; None without a path."""
    if path is None:
        return None
    from ragspec.drafting.model import load_draft_model as load

    return load(path, target)


def fp32_judge(engine: Engine, options: BenchOptions) -> Fp32Judge:
    """Judges bf16 divergences with the same model loaded in fp32 (from its source when known)."""
    def load() -> LoadedModel:
        if options.model is not None or engine.target.name == EMBEDDED_MODEL:
            return load_model(options.model, device=str(engine.target.device), dtype="float32")
        return dataclasses.replace(engine.target, model=copy.deepcopy(engine.target.model).float())

    return Fp32Judge(load)


def judge_divergences(run: WorkloadRun, judge: Fp32Judge) -> WorkloadRun:
    """The run with an fp32 DivergenceCheck for every output that leaves the reference's."""
    reference = run.outputs[REFERENCE_METHOD]
    checks: dict[str, dict[int, dict]] = {}
    for name, outputs in run.outputs.items():
        for index, (out, ref) in enumerate(zip(outputs, reference)):
            check = judge.check(run.prompt_ids[index], out.token_ids, ref.token_ids)
            if check is not None:
                checks.setdefault(name, {})[index] = check.as_dict()
    return dataclasses.replace(run, checks=checks)


def load_workloads(options: BenchOptions, engine: Engine) -> list[Workload]:
    """All workloads, read up front so a bad name fails before any timing starts."""
    budget = DocumentBudget(
        max_document_tokens=options.max_context_tokens,
        max_prompt_tokens=engine.target.context_length - options.max_new_tokens,
        truncate=tokenizer_truncate(engine.tokenizer),
        min_document_tokens=options.min_document_tokens,
        count_tokens=lambda text: len(engine.tokenizer(text, add_special_tokens=False).input_ids),
    )
    names = dict.fromkeys(options.workloads)
    return [load_workload(name, options.data_dir, options.limit, budget) for name in names]


def warm_up(methods: Sequence[Method], engine: Engine) -> None:
    """One short untimed generation per method (also profiles ragspec's latency curve once)."""
    messages = list(WARMUP_MESSAGES)
    prompt_ids = engine.encode(messages)
    for method in methods:
        log.info("warming up %s", method.name)
        method.run(messages, prompt_ids, WARMUP_TOKENS)


def run_workload(workload: Workload, methods: Sequence[Method], engine: Engine, max_new_tokens: int,
                 index_home: str | Path | None = None) -> WorkloadRun:
    """Each prompt runs through every method in turn (interleaved, so drift hits all alike).
    A RAG workload first builds its index under `index_home` (a temporary directory if None)."""
    if workload.rag is None:
        def prepare(request: Request) -> PreparedRequest:
            messages = prepare_messages(engine, request, max_new_tokens)
            return PreparedRequest(request.request_id, messages, engine.encode(messages), longdoc=longdoc_context(engine, request))

        return _run_requests(workload, methods, engine, max_new_tokens, prepare)
    with contextlib.ExitStack() as stack:
        home = index_home or stack.enter_context(tempfile.TemporaryDirectory(prefix="ragspec-bench-"))
        rag = RagRun.build_index(workload, engine, home)
        stack.callback(rag.close)
        run = _run_requests(workload, rag.methods(methods), engine, max_new_tokens, rag.prepare)
        return dataclasses.replace(run, extra={**run.extra, **rag.summary(run.outputs)})


def _run_requests(workload: Workload, methods: Sequence[Method], engine: Engine, max_new_tokens: int,
                  prepare: Callable[[Request], PreparedRequest]) -> WorkloadRun:
    outputs: dict[str, list[MethodOutput]] = {method.name: [] for method in methods}
    request_ids: list[str] = []
    prompt_ids: list[list[int]] = []
    total = len(workload.requests)
    for number, request in enumerate(workload.requests, 1):
        prepared = prepare(request)
        prompt_tokens = len(prepared.prompt_ids)
        if prompt_tokens + max_new_tokens > engine.target.context_length:
            log.warning("%s: skipping request %s (%d prompt tokens do not fit)",
                        workload.name, request.request_id, prompt_tokens)
            continue
        request_ids.append(request.request_id)
        prompt_ids.append(list(prepared.prompt_ids))
        for method in methods:
            longdoc = {"longdoc": prepared.longdoc} if prepared.longdoc and getattr(method, "reads_longdoc", False) else {}
            out = method.run(prepared.messages, prepared.prompt_ids, max_new_tokens, prepared.rag, **longdoc)
            outputs[method.name].append(out)
            log.info("%s [%d/%d] %-16s %4d prompt + %3d new tokens in %6.2fs (%6.1f tok/s)",
                     workload.name, number, total, method.name, prompt_tokens, len(out.token_ids),
                     out.wall_s, len(out.token_ids) / out.wall_s if out.wall_s > 0 else 0.0)
    if not request_ids:
        raise ConfigError(f"workload {workload.name}: no prompt fits the model's context")
    extra = {}
    if REFERENCE_METHOD in outputs:  # computed once here, not each time a (partial) report is built
        extra["copy_bound"] = copy_bounds(prompt_ids, [out.token_ids for out in outputs[REFERENCE_METHOD]])
    return WorkloadRun(workload.name, max_new_tokens, request_ids, outputs, extra=extra, prompt_ids=prompt_ids)


def longdoc_context(engine: Engine, request: Request) -> LongDocContext | None:
    """A long-document request's chunks (chunked and embedded untimed, as an index is built)."""
    if request.document is None or request.question is None:
        return None
    from ragspec.longdoc import DocumentChunks

    return LongDocContext(DocumentChunks.of(request.document, engine.tokenizer), request.question)


def prepare_messages(engine: Engine, request: Request, max_new_tokens: int) -> list[dict]:
    """Chat messages for the measured (last) turn; earlier turns are answered by plain greedy."""
    messages: list[dict] = []
    for turn in request.user_turns[:-1]:
        messages.append({"role": "user", "content": turn})
        answer = engine.generate(messages, max_new_tokens=max_new_tokens, speculative=False)
        messages.append({"role": "assistant", "content": answer.text})
    messages.append({"role": "user", "content": request.user_turns[-1]})
    return messages
