"""LangChain RAG over a ragspec index: RagSpecRetriever finds the chunks, ChatRagSpec answers
with them as context and as a drafting source (the index's token datastore), streamed through
an LCEL chain, then the request's speculation metrics.

    .venv/bin/python examples/langchain_rag.py "Who does Elizabeth marry?"

The first run builds the `pride-and-prejudice` index from the shared data folder (the same
recipe as `ragspec index build --recipe indexes/pride-and-prejudice.toml`, about a minute on a
2-core CPU) in the default index home (./indexes); later runs reuse it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from langchain_ragspec import ChatRagSpec, RagSpecRetriever
from ragspec.errors import IndexNotFound
from ragspec.index import build_index, open_index

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "pg1342_pride_and_prejudice.txt"


def ensure_index(name: str, home: str | None, corpus: Path) -> None:
    try:
        open_index(name, home=home).close()
    except IndexNotFound:
        print(f"building index '{name}' from {corpus} ...", flush=True)
        build_index([corpus], name, home=home, chunk_tokens=256, overlap_tokens=32, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="What does Mrs. Bennet tell her husband about Netherfield Park?")
    parser.add_argument("--index", default="pride-and-prejudice")
    parser.add_argument("--home", default=None, help="index home (default: ./indexes or $RAGSPEC_INDEX_HOME)")
    parser.add_argument("--corpus", type=Path, default=BOOK, help="text to index when the index is missing")
    parser.add_argument("-k", type=int, default=3, help="chunks to retrieve")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the engine's choice)")
    args = parser.parse_args()

    ensure_index(args.index, args.home, args.corpus)
    retriever = RagSpecRetriever(index=args.index, index_home=args.home, k=args.k)
    chat = ChatRagSpec(max_tokens=args.max_tokens, dtype=args.dtype, index_home=args.home)  # loads on first call
    chain = chat.with_retriever(retriever)  # an LCEL runnable: question -> retrieve -> answer
    print("loading the model and its latency curve (both cached after the first run) ...", flush=True)
    chat.get_engine().budget()  # else the first answer's tokens/s would include the loading

    for document in retriever.invoke(args.question):
        print(f"retrieved chunk {document.metadata['chunk_id']} (score {document.metadata['score']:.3f})")
    print(f"\nQ: {args.question}\nA: ", end="", flush=True)
    answer = None
    for chunk in chain.stream(args.question):
        print(chunk.content, end="", flush=True)
        answer = chunk if answer is None else answer + chunk
    report(answer)


def report(answer) -> None:
    meta, spec = answer.response_metadata, answer.response_metadata["speculation"]
    print(f"\n\nmodel {meta['model_name']}, finish reason {meta['finish_reason']}, "
          f"{answer.usage_metadata['output_tokens']} tokens at {spec['tokens_per_s']:.1f} tokens/s")
    print(f"mean acceptance length {spec['mean_acceptance_length']:.2f} tokens per target forward, "
          f"draft acceptance rate {spec['draft_acceptance_rate']:.2f}")
    print(f"accepted tokens per source: {spec['accepted_per_source']}")
    sources = meta["token_sources"]
    print("tokens by source: " + ", ".join(f"{s} {sources.count(s)}" for s in sorted(set(sources))))


if __name__ == "__main__":
    main()
