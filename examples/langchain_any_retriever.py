"""Retrieval from anywhere: a LangChain InMemoryVectorStore (embeddings from the embedded
all-MiniLM-L6-v2 through RagSpecEmbeddings) retrieves passages, and ChatRagSpec answers with
them as context AND drafting scope: their tokens go into a datastore built for the request, so
an existing Chroma/FAISS/pgvector pipeline gets retrieval drafts without a ragspec index.

    .venv/bin/python examples/langchain_any_retriever.py "Why does Elizabeth refuse Mr. Collins?"

`--compare` also answers without speculation and prints both speeds (greedy outputs are equal).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from langchain_core.vectorstores import InMemoryVectorStore

from langchain_ragspec import ChatRagSpec, RagSpecEmbeddings

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "pg1342_pride_and_prejudice.txt"


def passages(path: Path, count: int) -> list[str]:
    """The first `count` paragraphs of the novel (blank-line separated), joined into ~1k-char passages."""
    text = path.read_text(encoding="utf-8")
    body = text[text.find("It is a truth universally acknowledged"):]
    paragraphs = [" ".join(p.split()) for p in body.split("\n\n") if p.strip()][:count]
    out, current = [], ""
    for paragraph in paragraphs:
        if current and len(current) + len(paragraph) > 1000:
            out.append(current)
            current = ""
        current = f"{current}\n{paragraph}".strip()
    return out + ([current] if current else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="What does Mrs. Bennet tell her husband about Netherfield Park?")
    parser.add_argument("--corpus", type=Path, default=BOOK)
    parser.add_argument("--paragraphs", type=int, default=400, help="paragraphs of the corpus to index")
    parser.add_argument("-k", type=int, default=3, help="passages to retrieve")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--compare", action="store_true", help="also answer without speculation")
    args = parser.parse_args()

    store = InMemoryVectorStore(embedding=RagSpecEmbeddings())
    texts = passages(args.corpus, args.paragraphs)
    store.add_texts(texts)
    print(f"vector store: {len(texts)} passages from {args.corpus.name}")
    retriever = store.as_retriever(search_kwargs={"k": args.k})
    chat = ChatRagSpec(max_tokens=args.max_tokens, dtype=args.dtype)
    chain = chat.with_retriever(retriever)  # or: chat.invoke(q, documents=retriever.invoke(q))
    print("loading the model and its latency curve (both cached after the first run) ...", flush=True)
    chat.get_engine().budget()  # else the first answer's tokens/s would include the loading

    print(f"\nQ: {args.question}\nA: ", end="", flush=True)
    answer, start = None, time.perf_counter()
    for chunk in chain.stream(args.question):
        print(chunk.content, end="", flush=True)
        answer = chunk if answer is None else answer + chunk
    spec = answer.response_metadata["speculation"]
    print(f"\n\nspeculative: {answer.usage_metadata['output_tokens']} tokens in {time.perf_counter() - start:.1f} s "
          f"({spec['tokens_per_s']:.1f} tokens/s), mean acceptance length {spec['mean_acceptance_length']:.2f}, "
          f"draft acceptance rate {spec['draft_acceptance_rate']:.2f}")
    print(f"accepted tokens per source: {spec['accepted_per_source']} "
          f"('datastore' = drafted from the retrieved passages)")
    if args.compare:
        plain_chat = ChatRagSpec(max_tokens=args.max_tokens, dtype=args.dtype, speculative=False)  # same Engine
        plain = plain_chat.with_retriever(retriever).invoke(args.question)
        plain_spec = plain.response_metadata["speculation"]
        print(f"plain:       {plain.usage_metadata['output_tokens']} tokens ({plain_spec['tokens_per_s']:.1f} tokens/s); "
              f"same text: {plain.content == answer.content}")


if __name__ == "__main__":
    main()
