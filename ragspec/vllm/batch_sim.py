"""vLLM's persistent batch, as the proposer sees it, without vLLM: for tests and timing.

What it reproduces (vLLM v1 `InputBatch` + greedy chain verification): one row per running
request in `token_ids_cpu` [max_num_reqs, max_model_len] int32 and `num_tokens_no_spec`
[max_num_reqs] int32; a request's prompt prefilled (in chunks when `prefill_chunk` is set: empty
sampled lists until the last chunk); each later step accepts the longest prefix of last step's
drafts that the target (here an oracle continuation) agrees with, plus one bonus token, writes
them into the row and calls `propose`. Rows move: a finished or preempted request's row is
filled by the last row (`condense`, as vLLM does), and `swap` reorders rows. A preempted request
comes back with its prompt and output re-prefilled. The end-to-end check with vLLM itself is
`make vllm-check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SimRequest:
    prompt: list[int]
    oracle: list[int]  # the target's greedy output, what verification accepts against
    output: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)  # proposed for the next step
    prefilled: int = 0  # tokens of the row already prefilled
    steps: int = 0  # decode steps (target forwards after the prefill)
    accepted: int = 0  # drafts accepted

    @property
    def done(self) -> bool:
        return len(self.output) >= len(self.oracle)

    @property
    def mean_acceptance_length(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


class BatchSim:
    def __init__(self, proposer, k: int, max_num_reqs: int = 16, max_model_len: int = 4096,
                 prefill_chunk: int | None = None):
        self.proposer = proposer
        self.k = k
        self.token_ids_cpu = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens_no_spec = np.zeros(max_num_reqs, dtype=np.int32)
        self.rows: list[SimRequest | None] = [None] * max_num_reqs
        self.prefill_chunk = prefill_chunk
        self.max_draft = 0  # longest draft seen

    @property
    def running(self) -> list[SimRequest]:
        return [r for r in self.rows if r is not None]

    def add(self, request: SimRequest) -> int:
        """Place a new (or resumed) request in the first free row; its tokens so far are prefilled."""
        row = self.rows.index(None)
        tokens = request.prompt + request.output
        self.rows[row] = request
        self.token_ids_cpu[row, : len(tokens)] = tokens
        self.num_tokens_no_spec[row] = len(tokens)
        request.prefilled, request.drafts = 0, []
        return row

    def remove(self, request: SimRequest) -> None:
        """Finish or preempt: the row is freed and the batch condensed (the last row moves in)."""
        row = self.rows.index(request)
        last = max(i for i, r in enumerate(self.rows) if r is not None)
        if last != row:
            self._move(last, row)
        self.rows[last] = None
        self.num_tokens_no_spec[last] = 0

    def swap(self, a: int, b: int) -> None:
        self.token_ids_cpu[[a, b]] = self.token_ids_cpu[[b, a]]
        self.num_tokens_no_spec[[a, b]] = self.num_tokens_no_spec[[b, a]]
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]

    def _move(self, source: int, target: int) -> None:
        self.token_ids_cpu[target] = self.token_ids_cpu[source]
        self.num_tokens_no_spec[target] = self.num_tokens_no_spec[source]
        self.rows[target] = self.rows[source]

    def step(self) -> list[list[int]]:
        """One engine step: verify last step's drafts (or prefill), then ask for new drafts."""
        sampled_token_ids: list[list[int]] = []
        for row, request in enumerate(self.rows):
            sampled_token_ids.append([] if request is None else self._advance(row, request))
        drafts = self.proposer.propose(sampled_token_ids, self.num_tokens_no_spec, self.token_ids_cpu)
        if len(drafts) != len(sampled_token_ids):
            raise AssertionError(f"{len(drafts)} draft lists for {len(sampled_token_ids)} rows")
        for request, draft in zip(self.rows, drafts):
            self.max_draft = max(self.max_draft, len(draft))
            if len(draft) > self.k:
                raise AssertionError(f"a draft of {len(draft)} tokens, more than k={self.k}")
            if request is not None:
                request.drafts = [int(t) for t in draft]
            elif len(draft):
                raise AssertionError("a draft for an empty row")
        for request in [r for r in self.rows if r is not None and r.done]:
            self.remove(request)
        return drafts

    def _advance(self, row: int, request: SimRequest) -> list[int]:
        length = int(self.num_tokens_no_spec[row])
        if request.prefilled < length:  # prefill, maybe in chunks
            chunk = self.prefill_chunk or length
            request.prefilled = min(length, request.prefilled + chunk)
            if request.prefilled < length:
                return []
            sampled = [request.oracle[len(request.output)]]
        else:
            target = request.oracle[len(request.output):]
            accepted = 0
            while accepted < min(len(request.drafts), len(target) - 1) and request.drafts[accepted] == target[accepted]:
                accepted += 1
            sampled = target[: accepted + 1]
            request.steps += 1
            request.accepted += accepted
        request.output.extend(sampled)
        self.token_ids_cpu[row, length : length + len(sampled)] = sampled
        self.num_tokens_no_spec[row] = length + len(sampled)
        request.prefilled = length + len(sampled)
        return sampled

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.running:
                return
            self.step()
        raise AssertionError("requests did not finish")
