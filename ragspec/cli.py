"""Command line: a thin click layer over the library. Library errors become `Error: ...`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ragspec.cli_support import library_errors
from ragspec.config import MAX_SEED, MIN_TEMPERATURE


def _model_options(command):
    options = [
        click.option("--model", "model", default=None, help="HF model dir or .gguf file (default: embedded SmolLM2-135M-Instruct)."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)."),
        click.option("--backend", type=click.Choice(["transformers", "llamacpp"]), default="transformers",
                     show_default=True, expose_value=False, callback=_remember_backend,
                     help="What runs the target: transformers (torch), or llama.cpp on a .gguf file "
                          "(pip install 'ragspec[llamacpp]')."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _remember_backend(ctx, param, value: str) -> str:
    """--backend is read by _engine from the click context (the commands do not pass it on)."""
    ctx.meta["ragspec.backend"] = value
    return value


def _check_temperature(ctx, param, value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise click.BadParameter(f"{value} is too close to 0 to sample with: use 0 for greedy decoding, "
                                 f"or {MIN_TEMPERATURE} or more")
    return value


def _generation_options(command):
    options = [
        click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
                     help="At most this many tokens (and never past the context window)."),
        click.option("--temperature", default=0.0, show_default=True, type=float, callback=_check_temperature,
                     help=f"0 = greedy; sampling takes {MIN_TEMPERATURE} or more."),
        click.option("--top-k", default=0, type=click.IntRange(min=0), help="0 = off."),
        click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True), help="1 = off."),
        click.option("--seed", default=None, type=click.IntRange(0, MAX_SEED), help="Sampling seed, 0 to 2**64-1."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--no-spec", is_flag=True, help="Plain decoding, no speculation."),
        click.option("--stats", is_flag=True, help="Print acceptance and speed stats to stderr."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _draft_model_option(command):
    command = click.option("--eagle-head", default=None, metavar="PATH|auto",
                           help="Also draft with this EAGLE head over the target's hidden states (auto: the one "
                                "`ragspec draft train-eagle` made for the target).")(command)
    return click.option("--draft-model", default=None, metavar="PATH|auto",
                        help="Also draft with this small model (HF dir or .gguf with the target's tokenizer; "
                             "auto: the one `ragspec draft train` made for the target).")(command)


def _engine(model, dtype, device, draft_model=None, eagle_head=None, **engine_options):
    """The Engine; with `draft_model`, the "model" drafter joins the drafters (loaded at once, so
    a wrong path or tokenizer is reported before any prompt); with `eagle_head`, the "eagle" one."""
    from transformers.utils import logging as hf_logging

    from ragspec import Engine, SpecConfig

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    spec = engine_options.get("spec") or SpecConfig()
    if draft_model is not None:
        from ragspec.drafting.model import ModelDraftConfig

        engine_options["spec"] = spec = spec.with_drafter("model", ModelDraftConfig(model=draft_model))
    if eagle_head is not None:
        from ragspec.drafting.eagle import EagleDraftConfig

        engine_options["spec"] = spec.with_drafter("eagle", EagleDraftConfig(model=eagle_head))
    context = click.get_current_context(silent=True)
    backend = context.meta.get("ragspec.backend", "transformers") if context else "transformers"
    engine = Engine(model, dtype=None if dtype == "auto" else dtype, device=device, backend=backend, **engine_options)
    if draft_model is not None:
        from ragspec.drafting.model import engine_draft_model

        engine_draft_model(engine, draft_model)
    if eagle_head is not None:
        from ragspec.drafting.eagle import engine_head

        engine_head(engine, eagle_head)
    return engine


def _print_stats(stats) -> None:
    lines = [
        f"tokens: {stats.num_generated_tokens} in {stats.total_s:.2f} s = {stats.tokens_per_s:.1f} tok/s "
        f"(decode {stats.decode_tokens_per_s:.1f} tok/s, first token {stats.time_to_first_token_s * 1000:.0f} ms)",
        f"mean acceptance length: {stats.mean_acceptance_length:.2f} over {stats.num_steps} steps; "
        f"draft acceptance rate {stats.draft_acceptance_rate:.2f} ({stats.num_accepted_tokens}/{stats.num_draft_tokens})",
        f"prompt tokens from the prefix cache: {stats.cached_prompt_tokens}",
    ]
    for source, drafted in sorted(stats.drafted_per_source.items()):
        accepted = stats.accepted_per_source.get(source, 0)
        lines.append(f"  source {source}: accepted {accepted} of {drafted} drafted")
    click.echo("\n".join(lines), err=True)


def _stream(engine, prompt, options):
    """Print the reply as it is generated; return the finished Generation. `engine`: an Engine, or
    anything that streams the same way (a DocumentSession)."""
    show_stats = options.pop("stats")
    speculative = not options.pop("no_spec")
    stream = engine.stream(prompt, speculative=speculative, **options)
    for piece in stream:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if show_stats:
        _print_stats(stream.result.stats)
    return stream.result


@click.group()
@click.version_option(package_name="ragspec")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def main(verbose: bool) -> None:
    """ragspec: lossless speculative decoding for RAG and long documents."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command()
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@_model_options
@_draft_model_option
@_generation_options
@library_errors
def generate(prompt, raw, model, dtype, device, draft_model, eagle_head, **options):
    """Generate a reply to PROMPT.

    Example: ragspec generate "Summarize: ..." --max-new-tokens 128 --stats
    """
    engine = _engine(model, dtype, device, draft_model, eagle_head)
    _stream(engine, prompt if raw else [{"role": "user", "content": prompt}], options)


@main.command()
@click.option("--system", default=None, help="System message.")
@_model_options
@_draft_model_option
@_generation_options
@library_errors
def chat(system, model, dtype, device, draft_model, eagle_head, **options):
    """Chat in the terminal; the history is kept and drafted from. Empty line or Ctrl-D ends.

    Example: ragspec chat --stats
    """
    engine = _engine(model, dtype, device, draft_model, eagle_head)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = _stream(engine, history, dict(options))
        history.append({"role": "assistant", "content": reply.text})


@main.command()
@click.argument("questions", nargs=-1)
@click.option("--index", "index_name", default=None, help="Index name (under --home) or path.")
@click.option("--doc", "docs", multiple=True, type=click.Path(path_type=Path),
              help="Answer from this whole document (txt, md, html, pdf; repeatable) instead of an index.")
@click.option("-k", "k", default=None, type=click.IntRange(min=1),
              help="Chunks retrieved into the prompt [default: 5]; with --doc --rapid, into the RAPID draft prompt [4].")
@click.option("--rapid", is_flag=True,
              help="With --doc: also draft with RAPID (the model reading only the chunks closest to the question; "
                   "not a default drafter).")
@click.option("--rapid-lossy-eta", "rapid_lossy_eta", default=0.0, type=click.FloatRange(min=0.0), show_default=True,
              help="With --rapid: RAPID's knowledge transfer, LOSSY (answers are no longer the model's own): "
                   "the model's distribution shifted toward the drafter's by this strength (the paper's eta, e.g. 10).")
@click.option("--scope", type=click.Choice(["retrieved", "index"]), default="retrieved", show_default=True,
              help="Datastore drafting over the retrieved chunks only, or the whole index.")
@click.option("--show-sources", is_flag=True, help="List the retrieved chunks after the answer.")
@click.option("--home", default=None, envvar="RAGSPEC_INDEX_HOME", help="Folder holding the indexes.")
@_model_options
@_draft_model_option
@_generation_options
@library_errors
def ask(questions, index_name, docs, k, scope, show_sources, home, model, dtype, device, draft_model, eagle_head, rapid,
        rapid_lossy_eta, **options):
    """Answer QUESTIONS from an index (retrieve k chunks, draft from them) or from whole documents
    (--doc: the model reads all of it, later questions reuse the document's KV cache; with --rapid the
    RAPID drafter reads the chunks closest to the question). With --doc and no QUESTIONS, questions are read from
    stdin, one a line.

    Example: ragspec ask --index austen "Who does Elizabeth marry?" --stats --show-sources

    Example: ragspec ask --doc report.pdf "What was the revenue?" "And the costs?" --stats
    """
    from ragspec.config import SpecConfig

    if bool(index_name) == bool(docs):
        raise click.UsageError("pass --index NAME or --doc FILE (one of them)")
    if docs:
        if show_sources:
            raise click.UsageError("--show-sources lists an index's chunks: it does not apply to --doc")
        from ragspec.longdoc.cli import ask_documents

        from ragspec.drafting.registry import default_drafters

        if rapid_lossy_eta and not rapid:
            raise click.UsageError("--rapid-lossy-eta shifts the answer toward RAPID's drafts: it needs --rapid")
        spec = None
        if rapid:
            from ragspec.drafting.rapid import RapidConfig

            spec = SpecConfig(drafters=(*default_drafters(), "rapid"),
                              options=(RapidConfig(lossy_transfer_eta=rapid_lossy_eta),))
            if rapid_lossy_eta:
                click.echo(f"rapid: lossy knowledge transfer on (eta {rapid_lossy_eta:g}): answers may differ from "
                           "the model's own", err=True)
        return ask_documents(lambda: _engine(model, dtype, device, draft_model, eagle_head, spec=spec), docs, questions, options,
                             chunks=k, stream_answer=_stream)
    if rapid or rapid_lossy_eta:
        raise click.UsageError("--rapid drafts from a document's chunks: it needs --doc")
    if not questions:
        raise click.UsageError("missing QUESTIONS")
    engine = _engine(model, dtype, device, draft_model, eagle_head, index_home=home, spec=SpecConfig(datastore_scope=scope))
    for question in questions:
        result = _stream(engine, question, {**options, "index": index_name, "k": k or 5})
        if show_sources:
            for rank, chunk in enumerate(result.sources, 1):
                preview = " ".join(chunk.text.split())[:100]
                click.echo(f"[{rank}] {chunk.score:.3f} {chunk.source}: {preview}", err=True)


@main.command()
@_model_options
@library_errors
def info(model, dtype, device):
    """Show what the model runs on here and why: device, dtype, CPU flags, torch build, the
    kernels chosen (probe and timing results) and the cached verify-latency curve.

    Example: ragspec info --dtype bfloat16
    """
    from ragspec.kernels.info import format_info, runtime_info

    engine = _engine(model, dtype, device)
    click.echo("\n".join(format_info(runtime_info(engine.target))))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="RAGSPEC_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--index", "index_name", default=None, help="Index for requests that name none.")
@click.option("--home", default=None, envvar="RAGSPEC_INDEX_HOME", help="Folder holding the indexes.")
@click.option("--max-tokens-limit", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option("--spec-max-in-flight", default=None, type=click.IntRange(min=1),
              help="Requests admitted above this many in flight run without speculation [default: never off].")
@_model_options
@_draft_model_option
@library_errors
def serve(host, port, api_key, index_name, home, max_tokens_limit, spec_max_in_flight, model, dtype, device,
          draft_model, eagle_head):
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions), /metrics and a web page at /.

    Example: ragspec serve --index austen --port 8000
    """
    from ragspec.server import ServerConfig, check_installed, serve as run_server

    check_installed()
    config = ServerConfig(api_key=api_key, index=index_name, max_tokens_limit=max_tokens_limit,
                          spec_max_in_flight=spec_max_in_flight)
    from ragspec.engine.thread import EngineThread

    context = click.get_current_context()

    def build_engine():  # on the engine thread; click's context (the --backend choice) is per thread
        click.globals.push_context(context)
        try:
            return _engine(model, dtype, device, draft_model, eagle_head, index_home=home)
        finally:
            click.globals.pop_context()

    engine_thread = EngineThread()  # the engine is built and stepped on one thread (see EngineThread)
    engine = engine_thread.call(build_engine)
    if index_name:
        engine.open_index(index_name)
    run_server(engine, config, host=host, port=port, engine_thread=engine_thread)


def _attach_subcommands() -> None:
    from ragspec.bench.cli import bench_command
    from ragspec.draft_cli import draft_group
    from ragspec.index_cli import index_group

    main.add_command(bench_command, name="bench")
    main.add_command(draft_group, name="draft")
    main.add_command(index_group, name="index")


_attach_subcommands()

if __name__ == "__main__":
    main()
