"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on
127.0.0.1: chat and completions, streamed and not, stop sequences, retrieval documents, metrics,
bad requests. Greedy outputs are checked against an Engine run directly (fp32 tiny model)."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import FLAT_CURVE
from server_fixtures import LiveServer, metric_value

from ragspec import Engine
from ragspec.errors import ConfigError
from ragspec.server import ServerConfig, create_app

CHAT = [{"role": "user", "content": "Tell me a story about a red fox and a green frog."}]


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False)


@pytest.fixture(scope="module")
def plain(tiny_llama) -> Engine:
    """What the server's answers must equal: plain greedy decoding, no prefix cache."""
    return Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False, prefix_cache=False)


@pytest.fixture(scope="module")
def server(engine):
    with LiveServer(create_app(engine, ServerConfig(max_tokens_limit=512))) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(plain: Engine, prompt, **options):
    return plain.generate(prompt, speculative=False, **options)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-llama"


def test_chat_not_streamed_equals_plain_greedy(client, plain):
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=40, temperature=0)
    want = expected(plain, CHAT, max_new_tokens=40)
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == len(want.token_ids) == 40
    assert reply.usage.prompt_tokens == want.prompt_tokens
    metrics = reply.usage.model_extra["ragspec"]
    assert metrics["speculative"] is True and metrics["mean_acceptance_length"] >= 1.0
    assert sum(metrics["accepted_per_source"].values()) <= sum(metrics["drafted_per_source"].values())


def test_chat_streamed_equals_plain_greedy_token_by_token(client, plain):
    stream = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=48, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    want = expected(plain, CHAT, max_new_tokens=48)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    token_ids = [t for c in chunks if c.choices for t in (c.model_extra.get("ragspec") or {}).get("token_ids", [])]
    sources = [s for c in chunks if c.choices for s in (c.model_extra.get("ragspec") or {}).get("sources", [])]
    assert text == want.text and token_ids == want.token_ids
    assert len(sources) == len(token_ids) and "target" in sources
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 48
    assert last.usage.model_extra["ragspec"]["target_steps"] >= 1


def test_completions_streamed_and_not(client, plain):
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown"
    want = expected(plain, prompt, max_new_tokens=32)
    whole = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=32, temperature=0)
    assert whole.choices[0].text == want.text and whole.object == "text_completion"
    streamed = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=32, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(client, plain, stream):
    full = expected(plain, CHAT, max_new_tokens=40).text
    stop = full[len(full) // 2: len(full) // 2 + 4]
    want = expected(plain, CHAT, max_new_tokens=40, stop=[stop, "never-there"])
    assert want.finish_reason == "stop" and len(want.text) < len(full)
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=40, temperature=0,
                                           stop=[stop, "never-there"], stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        text, reason = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == want.text and stop not in text and reason == "stop"


def test_documents_go_into_the_prompt(client, plain):
    documents = ["The lighthouse keeper of Arnhem kept seven lamps burning every night of the winter."]
    question = [{"role": "user", "content": "How many lamps did the keeper keep?"}]
    want = expected(plain, question, max_new_tokens=32, documents=documents)
    reply = client.chat.completions.create(model="tiny-llama", messages=question, max_tokens=32, temperature=0,
                                           extra_body={"documents": documents})
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == want.prompt_tokens > len(plain.encode(question))


def test_speculation_off_per_request(client, plain):
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=24, temperature=0,
                                           extra_body={"speculative": False})
    metrics = reply.usage.model_extra["ragspec"]
    assert metrics["speculative"] is False and metrics["drafted_per_source"] == {}
    assert metrics["target_steps"] == 24 and reply.choices[0].message.content == expected(plain, CHAT, max_new_tokens=24).text


def test_metrics_count_requests_tokens_and_sources(server, client):
    before = httpx.get(server.url + "/metrics").text
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=20, temperature=0)
    after = httpx.get(server.url + "/metrics").text
    extra = reply.usage.model_extra["ragspec"]

    def delta(name, labels=""):
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta("ragspec_requests_total", 'endpoint="chat",finish_reason="length"') == 1
    assert delta("ragspec_generation_tokens_total") == 20
    assert delta("ragspec_prompt_tokens_total") == reply.usage.prompt_tokens
    assert delta("ragspec_time_to_first_token_seconds_count") == 1
    assert delta("ragspec_target_steps_total") == extra["target_steps"]
    for source, count in extra["accepted_per_source"].items():
        assert delta("ragspec_accepted_tokens_total", f'source="{source}"') == count
    assert metric_value(after, "ragspec_mean_acceptance_length") >= 1.0
    assert metric_value(after, "ragspec_requests_in_flight") == 0


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kwargs)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"messages": CHAT}, 400, "model"),
    ({"model": "tiny-llama"}, 400, "messages"),
    ({"model": "tiny-llama", "messages": []}, 400, "messages"),
    ({"model": "tiny-llama", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "tiny-llama", "messages": CHAT, "temperature": 7}, 400, "temperature"),
    ({"model": "tiny-llama", "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny-llama", "messages": CHAT, "max_tokens": 513}, 400, "max_tokens"),
    ({"model": "tiny-llama", "messages": CHAT, "n": 2}, 400, "n"),
    ({"model": "tiny-llama", "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "tiny-llama", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny-llama", "messages": CHAT, "index": "x", "documents": ["y"]}, 400, "documents"),
    ({"model": "gpt-4o", "messages": CHAT}, 404, "model"),
    ({"model": "tiny-llama", "messages": CHAT, "index": "no-such-index"}, 404, None),
])
def test_malformed_chat_requests_get_openai_errors(server, body, status, param):
    response = _post(server, "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert error["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny-llama", "prompt": [1, 2, 3]}, "prompt.str"),
    ({"model": "tiny-llama", "prompt": ""}, "prompt"),
    ({"model": "tiny-llama", "prompt": "hi", "echo": True}, "echo"),
    ({"model": "tiny-llama", "prompt": "hi", "logprobs": 2}, "logprobs"),
])
def test_malformed_completion_requests(server, body, param):
    response = _post(server, "/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_not_json_and_unknown_routes(server):
    response = _post(server, "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"] == "Not Found"


def test_prompt_too_long_is_a_400_and_the_engine_goes_on(server, client, plain):
    long_prompt = "word " * 2100  # the tiny model holds 2048 positions
    response = _post(server, "/v1/completions", json={"model": "tiny-llama", "prompt": long_prompt, "max_tokens": 4})
    assert response.status_code == 400 and "context" in response.json()["error"]["message"]
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected(plain, CHAT, max_new_tokens=8).text


@pytest.fixture(scope="module")
def guarded(engine):
    config = ServerConfig(api_key="s3cret", max_request_bytes=4000, max_tokens_limit=64, default_max_tokens=16)
    with LiveServer(create_app(engine, config)) as live:
        yield live


def test_api_key(guarded):
    body = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 4}
    assert _post(guarded, "/v1/chat/completions", json=body).status_code == 401
    wrong = _post(guarded, "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/metrics").status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200  # liveness probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0)
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, temperature=0)
    assert reply.usage.completion_tokens == 16  # the server's default max_tokens


def test_oversized_requests(guarded):
    auth = {"Authorization": "Bearer s3cret"}
    big = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = _post(guarded, "/v1/chat/completions", json=big, headers=auth)
    assert response.status_code == 413 and "4000 bytes" in response.json()["error"]["message"]

    def chunked():  # no content-length: counted while read
        yield b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    response = _post(guarded, "/v1/chat/completions", content=chunked(), headers=auth)
    assert response.status_code == 413
    too_many = _post(guarded, "/v1/chat/completions", json={**big, "messages": CHAT, "max_tokens": 65}, headers=auth)
    assert too_many.status_code == 400 and "limit of 64" in too_many.json()["error"]["message"]


@pytest.mark.parametrize("settings", [{"spec_max_in_flight": 0}, {"max_in_flight": 0}, {"k": -1}, {"api_key": " "},
                                      {"max_tokens_limit": 64, "default_max_tokens": 65}])
def test_bad_server_settings_are_config_errors(settings):
    with pytest.raises(ConfigError):
        ServerConfig(**settings)
