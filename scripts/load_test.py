"""Loopback load test of `ragspec serve`: 1, 4, 16 concurrent streaming clients, speculation on vs off.

Two server processes start on 127.0.0.1 (free ports), one per mode, so that neither mode's prefix
cache or learned drafts help the other; each serves the same prompts in the same order. Prompts:
Spec-Bench `summarization` (the article in the message) and `rag` (the passages sent as
`documents`, the question as the message). Within a mode no prompt is asked twice (unless the
workload runs out: the report says so), so the past-answers drafter never copies an earlier answer.

Bounded: each cell (workload x clients x mode) sends at most --requests-per-client per client and
starts no request after --cell-seconds; every request has a client timeout. Greedy (temperature 0).

    .venv/bin/python scripts/load_test.py --json bench-results/load.json          # the full run
    .venv/bin/python scripts/load_test.py --clients 1,4 --requests-per-client 1 --max-tokens 32 \
        --workloads summarization --json /tmp/load-smoke.json                      # a smoke run

Writes the JSON report and a Markdown table beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODES = {"spec": True, "plain": False}


@dataclass
class Sample:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    mean_acceptance_length: float = 0.0
    error: str = ""
    prompt: int = -1  # index in the cell's prompts
    text: str = ""  # the streamed answer


@dataclass
class Cell:
    workload: str
    clients: int
    mode: str
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    identical: tuple[int, int] | None = None  # speculative cells: (answers equal to plain's, answers compared)

    def summary(self) -> dict:
        done = [s for s in self.samples if s.ok]
        tokens = sum(s.output_tokens for s in done)
        return {
            "workload": self.workload, "clients": self.clients, "mode": self.mode,
            "requests": len(done), "errors": len(self.samples) - len(done), "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(len(done) / self.wall_s, 3) if self.wall_s else 0.0,
            "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "ttft_p50_s": _percentile([s.ttft_s for s in done], 50),
            "ttft_p99_s": _percentile([s.ttft_s for s in done], 99),
            "e2e_p50_s": _percentile([s.e2e_s for s in done], 50),
            "e2e_p99_s": _percentile([s.e2e_s for s in done], 99),
            "mean_acceptance_length": round(statistics.fmean([s.mean_acceptance_length for s in done]), 3)
            if done else 0.0,
            "first_errors": [s.error for s in self.samples if not s.ok][:3],
            "identical_to_plain": None if self.identical is None else "{}/{}".format(*self.identical),
        }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 4)


def load_prompts(workload: str, data_dir: Path) -> list[dict]:
    """Request bodies (messages, and documents for rag), in the data's order."""
    from ragspec.bench.workloads import load_workload, split_spec_bench_rag

    requests = load_workload(f"spec_bench:{workload}", data_dir).requests
    bodies = []
    for request in requests:
        turn = request.user_turns[0]
        if workload == "rag":
            passages, question = split_spec_bench_rag(turn)
            bodies.append({"messages": [{"role": "user", "content": question}], "documents": passages})
        else:
            bodies.append({"messages": [{"role": "user", "content": turn}]})
    return bodies


def one_request(url: str, body: dict, timeout: float) -> Sample:
    """Stream one chat completion; time to first text and to the end, tokens from the usage chunk."""
    start = time.perf_counter()
    ttft, usage, pieces = None, None, []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                return Sample(False, error=f"HTTP {response.status_code}: {response.read()[:200]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, error=chunk["error"]["message"])
                content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if content:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    pieces.append(content)
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        return Sample(False, error=f"{type(exc).__name__}: {exc}")
    if usage is None:
        return Sample(False, error="no usage chunk")
    end = time.perf_counter() - start
    return Sample(True, ttft if ttft is not None else end, end, usage["completion_tokens"],
                  usage["ragspec"]["mean_acceptance_length"], text="".join(pieces))


def run_cell(url: str, cell: Cell, prompts: list[dict], args, model_id: str) -> None:
    """`cell.clients` threads, each sending its share of `prompts` one after another."""
    deadline = time.perf_counter() + args.cell_seconds
    lock = threading.Lock()
    queue = list(enumerate(prompts))

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if not queue:
                    return
                index, prompt = queue.pop(0)
            body = {**prompt, "model": model_id, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "speculative": MODES[cell.mode]}
            sample = one_request(url, body, args.request_timeout)
            sample.prompt = index
            with lock:
                cell.samples.append(sample)

    start = time.perf_counter()
    with ThreadPoolExecutor(cell.clients) as pool:
        for _ in range(cell.clients):
            pool.submit(client)
    cell.wall_s = time.perf_counter() - start


class ServerProcess:
    """`ragspec serve` on a free loopback port, stopped with SIGINT."""

    def __init__(self, args):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "ragspec.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--max-tokens-limit", str(max(args.max_tokens, 1))]
        if args.model:
            command += ["--model", args.model]
        if args.dtype:
            command += ["--dtype", args.dtype]
        self.log = open(Path(args.json).with_suffix(f".server-{self.port}.log"), "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, seconds: float = 600) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited ({self.process.returncode}): see {self.log.name}")
            try:
                return httpx.get(self.url + "/v1/models", timeout=2).json()["data"][0]["id"]
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit(f"server not ready after {seconds:.0f} s: see {self.log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def slices(prompts: list[dict], sizes: list[int]) -> tuple[list[list[dict]], bool]:
    """Consecutive, non-overlapping slices of the given sizes (wrapping if the prompts run out)."""
    out, position, wrapped = [], 0, False
    for size in sizes:
        take = [prompts[(position + i) % len(prompts)] for i in range(size)]
        wrapped |= position + size > len(prompts)
        out.append(take)
        position += size
    return out, wrapped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    servers = {mode: ServerProcess(args) for mode in MODES}
    cells: list[Cell] = []
    notes = []
    try:
        model_ids = {mode: server.wait_ready() for mode, server in servers.items()}
        for workload in args.workloads.split(","):
            prompts = load_prompts(workload, Path(args.data_dir))
            sizes = [c * args.requests_per_client for c in clients]
            (warmup, *per_cell), wrapped = slices(prompts, [1, *sizes])
            if wrapped:
                notes.append(f"{workload}: {len(prompts)} prompts, fewer than the {1 + sum(sizes)} asked: some repeat")
            for mode, server in servers.items():  # the first request profiles the latency curve
                body = {**warmup[0], "model": model_ids[mode], "max_tokens": args.max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}, "speculative": MODES[mode]}
                one_request(server.url, body, args.request_timeout)
            for count, cell_prompts in zip(clients, per_cell):
                for mode, server in servers.items():
                    cell = Cell(workload, count, mode)
                    run_cell(server.url, cell, cell_prompts, args, model_ids[mode])
                    cells.append(cell)
                    print(json.dumps(cell.summary()), file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    compare_with_plain(cells)
    write_report(args, [c.summary() for c in cells], notes)
    return 0 if all(c.summary()["errors"] == 0 for c in cells) else 1


def compare_with_plain(cells: list[Cell]) -> None:
    """Each speculative cell's answers against the plain cell's for the same prompts (greedy: equal
    in float32 when nothing is lost or mixed up between concurrent streams)."""
    plain = {(c.workload, c.clients): {s.prompt: s.text for s in c.samples if s.ok} for c in cells if c.mode == "plain"}
    for cell in cells:
        reference = plain.get((cell.workload, cell.clients))
        if cell.mode == "plain" or reference is None:
            continue
        pairs = [(s.text, reference[s.prompt]) for s in cell.samples if s.ok and s.prompt in reference]
        cell.identical = (sum(mine == theirs for mine, theirs in pairs), len(pairs))


def write_report(args, rows: list[dict], notes: list[str]) -> None:
    plain = {(r["workload"], r["clients"]): r for r in rows if r["mode"] == "plain"}
    for row in rows:
        base = plain.get((row["workload"], row["clients"]))
        row["speedup_tokens_per_s"] = (round(row["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
                                       if base and base["output_tokens_per_s"] else None)
    report = {"settings": vars(args), "cells": rows, "notes": notes, "machine": {"cpus": os.cpu_count()}}
    Path(args.json).write_text(json.dumps(report, indent=2))
    lines = ["| workload | clients | mode | requests | errors | req/s | out tok/s | vs plain | TTFT p50 / p99 s | "
             "e2e p50 / p99 s | mean acc. len | same answers as plain |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['clients']} | {r['mode']} | {r['requests']} | {r['errors']} | "
                     f"{r['requests_per_s']} | {r['output_tokens_per_s']} | {r['speedup_tokens_per_s']}x | "
                     f"{r['ttft_p50_s']} / {r['ttft_p99_s']} | {r['e2e_p50_s']} / {r['e2e_p99_s']} | "
                     f"{r['mean_acceptance_length']} | {r['identical_to_plain'] or '-'} |")
    header = (f"Loopback load test: `ragspec serve`, {args.max_tokens} max tokens, greedy, "
              f"{args.requests_per_client} request(s) per client per cell, model {args.model or 'embedded'}"
              f"{', dtype ' + args.dtype if args.dtype else ''}.\n\n")
    body = header + "\n".join(lines) + "\n" + "".join(f"\nNote: {n}\n" for n in notes)
    Path(args.json).with_suffix(".md").write_text(body)
    print(body)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="Concurrent clients per cell, comma-separated.")
    parser.add_argument("--workloads", default="summarization,rag", help="Spec-Bench categories.")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cell-seconds", type=float, default=300.0, help="No request starts after this.")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--json", default="bench-results/load.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
