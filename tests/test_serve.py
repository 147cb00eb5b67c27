"""`crucible serve`: the official openai client, concurrency, disconnects and bad input."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
from serve_util import chat_run, live_server  # noqa: F401  (chat_run: session fixture)

from crucible.serve.app import create_app
from crucible.serve.engine import ChatEngine, load_engine

openai = pytest.importorskip("openai", reason="the openai client is pinned in requirements.lock")

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def engine(chat_run) -> ChatEngine:  # noqa: F811
    return load_engine(chat_run)


@pytest.fixture(scope="module")
def server(engine: ChatEngine):
    with live_server(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _request(
    server: str, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"
) -> tuple[int, dict]:
    url = urlparse(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    status, raw = resp.status, resp.read()
    conn.close()
    return status, json.loads(raw)


def _ask(client, text: str, seed: int, stream: bool, thinking: bool = True) -> tuple[str, int, str]:
    """(content, completion tokens, finish reason) of one request."""
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
        max_tokens=24,
        temperature=1.0,
        seed=seed,
        extra_body={"enable_thinking": thinking},
    )
    if not stream:
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return content, chunks[-1].usage.completion_tokens, finish[0]


def test_models_endpoint(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_openai_client_non_streaming_and_streaming_agree(client, engine: ChatEngine) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=16,
        temperature=0.8,
        top_p=0.9,
        seed=11,
    )
    prompt = engine.renderer.render([{"role": "user", "content": "Hello!"}], True)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=16,
        temperature=0.8,
        top_p=0.9,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_stream_is_sse_ending_with_done(server: str) -> None:
    url = urlparse(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_eight_concurrent_requests_match_their_solo_answers(client, engine: ChatEngine) -> None:
    jobs = [(f"question number {i}", 100 + i, i % 2 == 0, i % 3 != 0) for i in range(8)]
    solo = [_ask(client, *job) for job in jobs]
    assert len({s[0] for s in solo}) > 1, "distinct seeds/prompts should give distinct replies"
    before = engine.stats.requests
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: _ask(client, *job), jobs))
    assert together == solo
    assert engine.stats.requests == before + 8


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_stops_generation(server: str, engine: ChatEngine, stream: bool) -> None:
    # A slowed-down model (5 ms per token) so the reply would take seconds to finish.
    hook = engine.model.register_forward_hook(lambda *_: time.sleep(0.005))
    try:
        before_tokens, before_cancelled = engine.stats.tokens_generated, engine.stats.cancelled
        budget = 900  # greedy on this model: ~1 s of reserved tokens, no stop token
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "talk"}],
            "max_tokens": budget,
            "temperature": 0,
            "stream": stream,
        }
        url = urlparse(server)
        sock = socket.create_connection((url.hostname, url.port), timeout=10)
        payload = json.dumps(body).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )
        if stream:
            assert b"200 OK" in sock.recv(4096)
        deadline = time.monotonic() + 10
        while engine.stats.tokens_generated < before_tokens + 20:
            assert time.monotonic() < deadline, "generation did not start"
            time.sleep(0.01)
        sock.close()  # the client leaves mid-reply
        while engine.stats.cancelled == before_cancelled:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.01)
        generated = engine.stats.tokens_generated - before_tokens
        assert 20 <= generated < budget / 2
    finally:
        hook.remove()
    # The worker is free again.
    status, body = _request(
        server,
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        ).encode(),
    )
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


def _body(**fields) -> bytes:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return json.dumps({**base, **fields}).encode()


BAD = [
    ("malformed json", b'{"model": "tiny-chat", "messages": [', 400, None, None),
    ("not an object", b"[1, 2]", 400, None, None),
    ("nested too deeply", b"[" * 100_000, 400, None, None),
    ("seed out of range", _body(seed=2**70), 400, "seed", None),
    ("empty body", b"", 400, None, None),
    ("unknown model", _body(model="gpt-9"), 404, "model", "model_not_found"),
    ("no messages", _body(messages=[]), 400, "messages", None),
    ("unknown role", _body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", None),
    ("image content", _body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "messages.0.content", None),
    ("temperature < 0", _body(temperature=-0.1), 400, "temperature", None),
    ("temperature > 2", _body(temperature=2.5), 400, "temperature", None),
    ("top_p = 0", _body(top_p=0), 400, "top_p", None),
    ("top_p > 1", _body(top_p=1.5), 400, "top_p", None),
    ("max_tokens = 0", _body(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens < 0", _body(max_tokens=-3), 400, "max_tokens", None),
    ("max_tokens not a number", _body(max_tokens="many"), 400, "max_tokens", None),
    ("n = 2", _body(n=2), 400, "n", None),
    ("stop sequences", _body(stop=["\n"]), 400, "stop", None),
    ("prompt over the context", _body(messages=[{"role": "user", "content": "word " * 1500}]), 400, "messages", "context_length_exceeded"),
    ("prompt + max_tokens over the context", _body(max_tokens=1020), 400, "messages", "context_length_exceeded"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "status", "param", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_bodies(server, name, body, status, param, code) -> None:
    got, err = _request(server, "POST", "/v1/chat/completions", body)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert err["error"]["param"] == param and err["error"]["code"] == code


def test_bad_input_also_through_the_client_and_server_survives(client, server) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 1500}], stream=True
        )
    assert _request(server, "GET", "/no/such/path")[0] == 404
    assert _request(server, "GET", "/v1/models/other")[0] == 404
    assert _request(server, "GET", "/v1/chat/completions")[0] == 405
    status, _ = _request(server, "POST", "/v1/chat/completions", _body(), ctype="text/plain")
    assert status in (200, 400)  # never a 500
    assert _request(server, "POST", "/v1/chat/completions", _body())[0] == 200
    lone_surrogate = _body(messages=[{"role": "user", "content": "\ud800 hi"}])
    assert _request(server, "POST", "/v1/chat/completions", lone_surrogate)[0] == 200


def test_web_page_is_served(server: str) -> None:
    url = urlparse(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200 and "text/html" in resp.getheader("content-type")
    assert "/v1/chat/completions" in page and 'id="think"' in page


def test_think_flag_reaches_the_renderer(client, engine: ChatEngine) -> None:
    for flag in (False, True):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=1,
            extra_body={"chat_template_kwargs": {"enable_thinking": flag}},
        )
        assert engine.stats.thinking_modes[-1] is flag
