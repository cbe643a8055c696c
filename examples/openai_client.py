"""The official `openai` client against `ragspec serve`, unchanged: a chat answer, then the same
question streamed, then a RAG request with your own documents, printing ragspec's speculation
metrics from the `usage` block.

    .venv/bin/ragspec serve &                 # in another terminal, or in the background
    .venv/bin/python examples/openai_client.py [--url http://127.0.0.1:8000/v1] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import sys
import time

import openai

QUESTION = "Summarize in two sentences: the fox jumped over the fence, ran across the field, and the farmer's dog chased it until the fox hid in the woods."
DOCUMENTS = [
    "Pride and Prejudice is an 1813 novel by Jane Austen. Elizabeth Bennet, the protagonist, marries Fitzwilliam Darcy.",
    "Jane Bennet, Elizabeth's elder sister, marries Charles Bingley, Darcy's friend.",
]


def wait_for_server(client: openai.OpenAI, seconds: float = 120.0) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.models.list().data[0].id
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                sys.exit(f"no server at {client.base_url}: start one with `ragspec serve`")
            time.sleep(1.0)


def show_metrics(usage) -> None:
    extra = usage.model_extra.get("ragspec", {})
    print(f"  [{usage.completion_tokens} tokens, {extra.get('tokens_per_s', 0):.1f} tok/s, "
          f"mean acceptance length {extra.get('mean_acceptance_length', 0):.2f}, "
          f"accepted per source {extra.get('accepted_per_source', {})}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="The server's --api-key, if it has one.")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key)
    model = wait_for_server(client)
    messages = [{"role": "user", "content": QUESTION}]

    print(f"model: {model}\n\n1. chat, whole answer:")
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0)
    print(reply.choices[0].message.content)
    show_metrics(reply.usage)

    print("\n2. the same question, streamed:")
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print()
            show_metrics(chunk.usage)

    print("\n3. RAG over documents sent with the request (context and drafting scope):")
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Whom does Elizabeth Bennet marry?"}],
        max_tokens=args.max_tokens, temperature=0, extra_body={"documents": DOCUMENTS})
    print(reply.choices[0].message.content)
    show_metrics(reply.usage)


if __name__ == "__main__":
    main()
