"""OpenAI response bodies and stream chunks for chat completions and completions.

ragspec's additions ride along as extra fields, which OpenAI's clients keep: `usage.ragspec`
(the request's speculation metrics) and, on each stream chunk, `ragspec` with the chunk's token
ids, the drafter of each (`sources`; "target" for the target's own token) and `segments`, the
chunk's text split per token with its source.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ragspec.engine.request import Piece

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(generation, speculative: bool) -> dict:
    stats = generation.stats
    completion = len(generation.token_ids)
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": generation.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
        "ragspec": {
            "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
            "draft_acceptance_rate": round(stats.draft_acceptance_rate, 4),
            "accepted_per_source": dict(stats.accepted_per_source),
            "drafted_per_source": dict(stats.drafted_per_source),
            "target_steps": stats.num_steps,
            "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
            "tokens_per_s": round(stats.tokens_per_s, 2),
            "speculative": speculative,
        },
    }


@dataclass
class Formatter:
    """Builds one request's bodies: `chat` selects chat.completion(.chunk) over text_completion."""

    chat: bool
    model: str
    speculative: bool
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, generation) -> dict:
        reason = FINISH_REASONS.get(generation.finish_reason, generation.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                      "logprobs": None, "finish_reason": reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": reason}
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage(generation, self.speculative)
        return body

    def _chunk(self, content: str | None, reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {} if content is None else {"content": content}
            if role:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": reason}
            body = self._envelope("text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def first_chunk(self) -> dict | None:
        return self._chunk(None, None, role=True) if self.chat else None

    def piece_chunk(self, piece: Piece, segments: list[tuple[str, str]]) -> dict:
        body = self._chunk(piece.text, None)
        body["ragspec"] = {"token_ids": piece.token_ids, "sources": piece.sources,
                           "segments": [list(s) for s in segments]}
        return body

    def final_chunk(self, generation) -> dict:
        reason = FINISH_REASONS.get(generation.finish_reason, generation.finish_reason)
        return self._chunk(None if self.chat else "", reason)

    def usage_chunk(self, generation) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(generation, self.speculative)
        return body
