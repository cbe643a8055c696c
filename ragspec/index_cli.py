"""`ragspec index ...`: a thin click layer over ragspec.index. Library errors become `Error: ...`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ragspec.cli_support import library_errors


def _home_option(command):
    return click.option(
        "--home", type=click.Path(file_okay=False, path_type=Path), default=None, envvar="RAGSPEC_INDEX_HOME",
        help="Folder holding the indexes (default: ./indexes, or $RAGSPEC_INDEX_HOME).",
    )(command)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _report_build(index) -> None:
    stats = index.build_stats
    for path, reason in stats.skipped:
        click.echo(f"Warning: skipped {path}: {reason}", err=True)
    click.echo(
        f"{index.name}: {stats.num_documents} new document(s), {stats.num_chunks} chunk(s), "
        f"{stats.num_tokens} token(s) in {stats.seconds:.1f} s; index now holds {index.num_documents} "
        f"document(s), {index.num_chunks} chunk(s), {len(index.datastore)} tokens at {index.path}"
    )
    click.echo(f"build time {stats.seconds:.1f} s, peak memory {_human(stats.peak_rss_bytes)} "
               f"(this process {_human(stats.peak_rss_self_bytes)}, + its largest child)")


@click.group("index")
def index_group():
    """Build and manage retrieval indexes (dense FAISS + token datastore for drafting).

    \b
    Example:
      ragspec index build docs/ notes.md --name docs
      ragspec index query docs "how do I reset the device?" -k 3
    """


@index_group.command("build")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Index name (a folder under the home).")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML recipe with name, paths and options (see indexes/README.md); flags given override it.")
@click.option("--model", default=None, help="Target model whose tokenizer the datastore uses: HF dir or .gguf (default: embedded SmolLM2-135M-Instruct).")
@click.option("--embedder", default=None, help="sentence-transformers model dir (default: embedded all-MiniLM-L6-v2).")
@click.option("--faiss", "faiss_factory", default=None, help="FAISS factory string, e.g. Flat (default), HNSW32,Flat, IVF256,Flat.")
@click.option("--on-disk/--in-memory", "on_disk", default=None,
              help="Keep an IVF dense index's inverted lists on disk (dense.ivfdata, memory-mapped), for indexes "
                   "larger than memory; needs e.g. --faiss IVF4096,Flat (default: in memory).")
@click.option("--chunk-tokens", default=None, type=int, help="Chunk size in target tokens (default 256).")
@click.option("--overlap-tokens", default=None, type=int, help="Tokens shared by neighbouring chunks (default 32).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_home_option
@library_errors
def build_command(paths, name, recipe, model, embedder, faiss_factory, on_disk, chunk_tokens, overlap_tokens, quiet,
                  home):
    """Build index NAME from files and directories (txt, md, rst, html, jsonl with a "text" field).

    An existing index of the same name is replaced only once the new one is complete. Documents
    are streamed in batches (memory does not grow with the corpus, beyond the suffix array's
    8 bytes per token); the build time and peak memory are printed at the end.

    \b
    Example:
      ragspec index build docs/ faq.jsonl --name docs --chunk-tokens 128 --faiss HNSW32,Flat
      ragspec index build --recipe indexes/pride-and-prejudice.toml
      ragspec index build big/ --name big --faiss IVF4096,Flat --on-disk
    """
    from ragspec.index import build_index
    from ragspec.index.recipe import Recipe, load_recipe
    from ragspec.models import EMBEDDED_MODEL

    base = load_recipe(recipe) if recipe else Recipe(name="", paths=())
    name, paths = name or base.name, list(paths) or list(base.paths)
    if not name or not paths:
        raise click.UsageError("give PATH... and --name NAME, or --recipe FILE")
    index = build_index(
        paths, name, home=home, model_name=model or base.model or EMBEDDED_MODEL,
        embedder=embedder or base.embedder, faiss_factory=faiss_factory or base.faiss,
        chunk_tokens=chunk_tokens if chunk_tokens is not None else base.chunk_tokens,
        overlap_tokens=overlap_tokens if overlap_tokens is not None else base.overlap_tokens,
        progress=not quiet, on_disk=on_disk if on_disk is not None else base.dense_on_disk,
    )
    _report_build(index)


@index_group.command("add")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_home_option
@library_errors
def add_command(name, paths, quiet, home):
    """Add the documents under PATHS that index NAME does not hold yet.

    \b
    Example:
      ragspec index add docs new-notes/
    """
    from ragspec.index import add_to_index

    _report_build(add_to_index(name, list(paths), home=home, progress=not quiet))


@index_group.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_home_option
@library_errors
def info_command(name, as_json, home):
    """Show the manifest, file sizes and counts of index NAME.

    \b
    Example:
      ragspec index info docs
    """
    from ragspec.index import open_index

    index = open_index(name, home)
    if as_json:
        click.echo(json.dumps(index.manifest, indent=2))
        return
    manifest = index.manifest
    click.echo(f"index {index.name} at {index.path} (version {index.files.name})")
    for key, value in manifest.items():
        if key != "files":
            click.echo(f"  {key}: {value}")
    for file in sorted(index.files.iterdir()):
        click.echo(f"  file {file.name}: {_human(file.stat().st_size)}")


@index_group.command("query")
@click.argument("name")
@click.argument("text")
@click.option("-k", "k", default=5, show_default=True, type=int, help="Number of chunks.")
@click.option("--width", default=200, show_default=True, type=int, help="Characters of each chunk to show (0 = all).")
@_home_option
@library_errors
def query_command(name, text, k, width, home):
    """Show the K chunks of index NAME closest to TEXT, with scores and sources.

    \b
    Example:
      ragspec index query docs "what is the refund policy?" -k 5
    """
    from ragspec.index import open_index

    for rank, hit in enumerate(open_index(name, home).search(text, k), start=1):
        body = " ".join(hit.text.split())
        if width and len(body) > width:
            body = body[:width] + "..."
        click.echo(f"{rank}. score {hit.score:.3f}  {hit.source}  (chunk {hit.chunk_id})\n   {body}")


@index_group.command("ls")
@_home_option
@library_errors
def ls_command(home):
    """List the indexes under the home.

    \b
    Example:
      ragspec index ls --home ~/indexes
    """
    from ragspec.index import list_indexes

    for name in list_indexes(home):
        click.echo(name)


@index_group.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_home_option
@library_errors
def rm_command(name, yes, home):
    """Delete index NAME (a NAME that is a symbolic link: only the link).

    \b
    Example:
      ragspec index rm docs --yes
    """
    from ragspec.index import remove_index
    from ragspec.index.index import resolve

    path = resolve(name, home)
    link = f" (a link to {path.resolve()}, which is kept)" if path.is_symlink() else ""
    if not yes:
        click.confirm(f"Delete index {name} at {path}{link}?", abort=True)
    remove_index(name, home)
    click.echo(f"removed {path}{link}")


@index_group.command("verify")
@click.argument("name")
@_home_option
@library_errors
def verify_command(name, home):
    """Check every file of index NAME against its recorded checksum.

    \b
    Example:
      ragspec index verify docs
    """
    from ragspec.index import verify_index

    index = verify_index(name, home)
    files = ", ".join(sorted(index.manifest["files"]))
    click.echo(f"{index.name}: ok ({files} match their sha256; meta.sqlite passes its integrity check)")
