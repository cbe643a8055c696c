"""Long-document QA: several L-Eval questions about one document, asked in one DocumentSession.

The model reads the whole document for every question; the RAPID drafter reads only the chunks
closest to the question. The first question prefills the document; the later ones find its KV
cache and prefill only themselves. Each question is also answered by plain decoding (its own
session, the same document cache), so the output can be compared token for token.

    python examples/longdoc_qa.py                       # quality, document 0, 4 questions
    python examples/longdoc_qa.py --set financial_qa --document 2 --questions 6 --max-new-tokens 96

Per question it prints: time to first token (wall time from asking: retrieval and, for the first
question, the document's prefill and indexing included), decode tokens/s, mean acceptance length
(tokens per target forward) and whether the answer equals plain decoding. Documents are cut to
--max-document-tokens (the model's context is 8k tokens; L-Eval's run to ~7k).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ragspec import Engine, load_model
from ragspec.bench.longdoc_sessions import ask_all, leval_documents
from ragspec.bench.workloads import DocumentBudget, tokenizer_truncate
from ragspec.longdoc import DocumentSession

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="quality", help="L-Eval file under DATA_DIR/longdoc (quality, "
                        "scientific_qa, financial_qa) or a path to an L-Eval-schema .jsonl")
    parser.add_argument("--document", type=int, default=0, help="which document (row) of the file")
    parser.add_argument("--questions", type=int, default=4, help="questions asked about it, in L-Eval's order")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-document-tokens", type=int, default=5500)
    parser.add_argument("--dtype", default="float32", help="float32 (bit-identical outputs) or bfloat16")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    args = parser.parse_args()

    name = f"jsonl:{args.set}" if args.set.endswith(".jsonl") else f"longdoc:{args.set}"
    document, questions = leval_documents(name, args.data_dir, limit=args.document + 1)[args.document]
    questions = questions[: args.questions]

    model = load_model(None, dtype=args.dtype)
    speculative, plain = Engine(model), Engine(model)  # one prefix cache each
    budget = DocumentBudget(args.max_document_tokens, model.context_length - args.max_new_tokens,
                            tokenizer_truncate(model.tokenizer))
    text = budget.cut(document, max(len(model.tokenizer(q).input_ids) for q in questions))
    spec_session, plain_session = DocumentSession(speculative, text), DocumentSession(plain, text)
    print(f"{name} document {args.document}: {spec_session.document_tokens} prompt tokens before the question, "
          f"{len(questions)} questions\n")

    print(f"{'#':>2} {'TTFT s':>7} {'plain TTFT s':>12} {'decode tok/s':>12} {'plain':>7} {'MAL':>5}  identical")
    for number, question in enumerate(questions, 1):
        (fast,) = ask_all(spec_session, [question], args.max_new_tokens, speculative=True)
        (slow,) = ask_all(plain_session, [question], args.max_new_tokens, speculative=False)
        same = "yes" if fast.token_ids == slow.token_ids else "NO"
        print(f"{number:>2} {fast.ttft_s:7.2f} {slow.ttft_s:12.2f} {fast.decode_tokens_per_s:12.1f} "
              f"{slow.decode_tokens_per_s:7.1f} {fast.mean_acceptance_length:5.2f}  {same}")
        print(textwrap.indent(textwrap.fill(question.split("\n")[0], 96), "     Q: "))
        answer = model.tokenizer.decode(fast.token_ids, skip_special_tokens=True).strip()
        print(textwrap.indent(textwrap.fill(answer or "(empty)", 96), "     A: ") + "\n")


if __name__ == "__main__":
    main()
