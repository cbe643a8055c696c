"""The server under concurrent and abandoned streams, and `ragspec serve` as a process.

16 clients stream at once through one Engine: each greedy stream equals its own single-request
output (fp32), token ids included. A client that disconnects mid-stream ends its request at once
("cancelled"), and the next request of that conversation reuses the cancelled request's cached
prefix and answers as a fresh engine would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from conftest import FLAT_CURVE, build_tiny_model, tiny_loaded
from server_fixtures import LiveServer, metric_value

from ragspec import Engine
from ragspec.cli import main
from ragspec.server import ServerConfig, create_app

CHAT = [{"role": "user", "content": "Tell me a story about a red fox and a green frog."}]
ANIMALS = ["fox", "frog", "owl", "bear", "wolf", "hare", "lynx", "crow", "seal", "mole", "deer", "newt",
           "swan", "toad", "wren", "yak"]


def _fresh(model, **options) -> Engine:
    return Engine(model, latency_curve=FLAT_CURVE, persist_state=False, **options)


def _metrics(server) -> str:
    return httpx.get(server.url + "/metrics").text


def _stream_chat(client: openai.OpenAI, messages, max_tokens: int) -> dict:
    started = time.perf_counter()
    text, token_ids, first = [], [], None
    for chunk in client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        extra = chunk.model_extra.get("ragspec") or {}
        if extra.get("token_ids") and first is None:
            first = time.perf_counter()
        token_ids += extra.get("token_ids", [])
        text.append(chunk.choices[0].delta.content or "")
    return {"text": "".join(text), "token_ids": token_ids, "first": first, "end": time.perf_counter(),
            "start": started}


def test_16_concurrent_streams_each_equal_their_own_output(tiny_llama):
    prompts = [[{"role": "user", "content": f"Write a short tale about a {animal} who found a key."}]
               for animal in ANIMALS]
    reference = _fresh(tiny_llama, prefix_cache=False)
    wanted = [reference.generate(p, max_new_tokens=32, speculative=False) for p in prompts]
    with LiveServer(create_app(_fresh(tiny_llama))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: _stream_chat(client, p, 32), prompts))
        metrics = _metrics(server)
    for got, want in zip(results, wanted):
        assert got["text"] == want.text and got["token_ids"] == want.token_ids
    # they ran interleaved: several streams had their first token before the first stream ended
    first_end = min(r["end"] for r in results)
    assert sum(r["first"] < first_end for r in results) >= 2
    assert metric_value(metrics, "ragspec_requests_total", 'finish_reason="length"') == 16
    assert metric_value(metrics, "ragspec_requests_in_flight") == 0


def _wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_work_and_the_next_turn_reuses_its_cache(tiny_llama):
    engine = _fresh(tiny_llama)
    with LiveServer(create_app(engine, ServerConfig(max_tokens_limit=1500))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        first = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=24, temperature=0)
        turn2 = [*CHAT, {"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And what happened next?"}]
        before = _metrics(server)
        body = {"model": "tiny-llama", "messages": turn2, "max_tokens": 1500, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 4:
                    break  # leaving the block closes the connection mid-stream
        _wait_for(lambda: metric_value(_metrics(server), "ragspec_requests_total", 'finish_reason="cancelled"') == 1)
        after = _metrics(server)
        generated = (metric_value(after, "ragspec_generation_tokens_total")
                     - metric_value(before, "ragspec_generation_tokens_total"))
        assert 0 < generated < 1500  # ended early, not run to max_tokens
        assert metric_value(after, "ragspec_requests_in_flight") == 0 and server.state.policy.in_flight == 0
        again = client.chat.completions.create(model="tiny-llama", messages=turn2, max_tokens=24, temperature=0)
    want = _fresh(tiny_llama, prefix_cache=False).generate(turn2, max_new_tokens=24, speculative=False)
    assert again.choices[0].message.content == want.text
    # the whole prompt but its last token came from the cancelled request's cache
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_load_policy_turns_speculation_off_above_its_threshold(tiny_llama):
    config = ServerConfig(spec_max_in_flight=1)
    with LiveServer(create_app(_fresh(tiny_llama), config)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        alone = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, temperature=0)
        assert alone.usage.model_extra["ragspec"]["speculative"] is True
        body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            next(response.iter_lines())  # one request in flight: the next one is the second
            crowded = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, temperature=0)
    assert crowded.usage.model_extra["ragspec"]["speculative"] is False
    assert crowded.choices[0].message.content == alone.choices[0].message.content


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-serve"
    build_tiny_model("llama", len(tokenizer), seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ragspec_serve_process(model_dir, tokenizer):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "ragspec.cli", "serve", "--model", str(model_dir), "--dtype", "float32",
               "--device", "cpu", "--port", str(port), "--api-key", "k3y"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: process.poll() is None and _up(url), seconds=90)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        model_id = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=12, temperature=0,
                                               extra_body={"speculative": False})
        want = _fresh(tiny_loaded("llama", tokenizer, seed=5), prefix_cache=False)
        assert reply.choices[0].message.content == want.generate(CHAT, max_new_tokens=12, speculative=False).text
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert f"127.0.0.1:{port}" in output


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_ragspec_serve_with_a_missing_index_is_one_error_line(model_dir, tmp_path):
    result = CliRunner().invoke(main, ["serve", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu",
                                       "--index", "no-such-index", "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1


class _BrokenDrafter:
    """Raises on its third proposal: an engine error in the middle of a request."""

    name = "broken"

    def __init__(self):
        self.calls = 0

    def propose(self, context):
        from ragspec.types import DraftTree

        self.calls += 1
        if self.calls >= 3:
            raise RuntimeError("drafter broke")
        return DraftTree.empty()

    def observe(self, step) -> None:
        pass


def _broken_setup(engine):
    raise RuntimeError("factory broke")


def test_engine_errors_are_openai_errors_and_the_engine_serves_on(tiny_llama):
    engine = Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False,
                    drafter_factories=[lambda e: [_BrokenDrafter()]])
    with LiveServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 16, "temperature": 0}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 500 and "drafter broke" in response.json()["error"]["message"]
        with pytest.raises(openai.APIError, match="drafter broke"):
            list(client.chat.completions.create(**body, stream=True))
        engine.drafter_factories = [_broken_setup]
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 500 and "factory broke" in response.json()["error"]["message"]
        reply = client.chat.completions.create(**body, extra_body={"speculative": False})
        metrics = _metrics(server)
    want = _fresh(tiny_llama, prefix_cache=False).generate(CHAT, max_new_tokens=16, speculative=False)
    assert reply.choices[0].message.content == want.text
    assert metric_value(metrics, "ragspec_requests_total", 'finish_reason="error"') == 2
    assert metric_value(metrics, "ragspec_requests_in_flight") == 0
