"""`serve` (apps/server.py) on a tiny random chat model: the official openai client, the judge's
backend, per-row steering in one batch, bad input, a client that leaves mid-stream, and a bounded
load test on 127.0.0.1.

Every reply is checked against model.generate run alone on the same request (the independent
reference)."""

import json
import math
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from tiny import CORPUS, tiny_model_with_vectors

import judge as J
import model as M
import persona_vectors as pv
from apps import server as S
from apps.monitor import Gauge
from support import checkpoint

TIMEOUT = 60  # seconds, for every client call


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("tiny"))
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    return d, vectors, model, tok


def start(tiny, **kw):
    """An engine and a server on a free port of 127.0.0.1, serving in a thread -> (url, engine,
    server)."""
    d, vectors, model, tok = tiny
    engine = S.Engine(
        model,
        tok,
        vectors,
        **(
            {"max_batch": 16, "max_tokens_limit": 3000, "max_n": 4, "batch_wait": 0.01}
            | kw.pop("engine", {})
        ),
    )
    server = S.make_server(engine, "127.0.0.1", 0, **({"quiet": True} | kw))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", engine, server


def stop(engine, server):
    server.shutdown()
    server.server_close()
    engine.close()


@pytest.fixture(scope="module")
def srv(tiny):
    url, engine, server = start(tiny, max_body=100_000)
    yield url, engine
    stop(engine, server)


def reference(
    tiny, messages, max_tokens, steer=(), layer=None, positions="response", **kw
) -> list[int]:
    """M.generate alone on this request: the tokens of the reply."""
    d, vectors, model, tok = tiny
    interventions = []
    for spec in steer:  # one spec at a time, as the server resolves each entry with its own layer
        interventions += pv.steering([spec], model, vectors, layer, positions)
    return M.generate(
        model,
        [tok.encode_chat(messages)],
        max_tokens,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        steer=interventions,
        **kw,
    )[0]


def gauge_reference(tiny, messages, out, trait) -> tuple[float, float]:
    """The before-reply and reply-mean projections from a forward pass over prompt + reply (teacher
    forcing)."""
    d, vectors, model, tok = tiny
    g = Gauge.from_file(
        vectors / f"{trait}_response_avg_diff.safetensors", None, model.config.num_hidden_layers
    )
    ids = tok.encode_chat(messages)
    cap = M.Capture()
    with torch.no_grad():
        model(
            torch.tensor([ids + out]),
            answer_start=torch.tensor([len(ids)]),
            capture=cap,
            logits="none",
        )
    return float(cap.prompt_last()[0, g.layer] @ g.unit), float(
        cap.answer_mean()[0, g.layer] @ g.unit
    )


@pytest.fixture
def client():
    """client(url) -> an openai client; every one is closed at the end of the test, so that no
    keep-alive connection (and no server thread waiting on it) outlives the test."""
    openai = pytest.importorskip("openai")
    opened = []

    def make(url, **kw):
        opened.append(
            openai.OpenAI(
                base_url=url,
                api_key=kw.pop("api_key", "unused"),
                timeout=TIMEOUT,
                max_retries=0,
                **kw,
            )
        )
        return opened[-1]

    yield make
    for c in opened:
        c.close()


HI = [{"role": "user", "content": "What is the capital of France?"}]
NUMBERS = [{"role": "system", "content": "Count."}, {"role": "user", "content": "Numbers: 1 2 3"}]


# ------------------------------------------------------------------------------------ openai client
def test_openai_plain_equals_generate(tiny, srv, client):
    url, engine = srv
    d, vectors, model, tok = tiny
    c = client(url)
    assert [m.id for m in c.models.list()] == [str(d)]
    for messages in (HI, NUMBERS):
        r = c.chat.completions.create(
            model="anything", messages=messages, max_tokens=12, temperature=0
        )
        out = reference(tiny, messages, 12)
        assert (
            r.choices[0].message.content == tok.decode(out)
            and r.choices[0].finish_reason == "length"
        )
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
            len(tok.encode_chat(messages)),
            len(out),
        )
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        persona = r.choices[0].model_extra["persona"]
        assert set(persona) == {"evil", "humorous"}
        before, reply = gauge_reference(tiny, messages, out, "evil")
        assert persona["evil"]["before_reply"] == pytest.approx(before, abs=1e-4)
        assert persona["evil"]["reply"] == pytest.approx(reply, abs=1e-4)
        assert persona["evil"]["marks"] == {"before_reply": [-1.0, 1.0], "reply": [-2.0, 2.0]}


def test_openai_streaming_equals_plain(tiny, srv, client):
    url, _ = srv
    d, vectors, model, tok = tiny
    c = client(url)
    chunks = list(
        c.chat.completions.create(
            model="m",
            messages=NUMBERS,
            max_completion_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    out = reference(tiny, NUMBERS, 15)
    assert text == tok.decode(out)
    streamed = [
        e.token
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert streamed == [
        tok.decode([t], skip_special_tokens=False) for t in out
    ]  # one entry per token, in order
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][0]
    assert (
        final.choices[0].finish_reason == "length"
        and "evil" in final.choices[0].model_extra["persona"]
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(out)
    # the wire format itself ends with [DONE]
    r = requests.post(
        f"{url}/chat/completions",
        json={"messages": HI, "max_tokens": 3, "stream": True},
        timeout=TIMEOUT,
    )
    assert r.headers["Content-Type"] == "text/event-stream" and r.text.endswith("data: [DONE]\n\n")


def test_openai_logprobs_equal_the_model(tiny, srv, client):
    url, _ = srv
    d, vectors, model, tok = tiny
    r = client(url).chat.completions.create(
        model="m", messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    out = reference(tiny, HI, 8)
    ids = tok.encode_chat(HI)
    with torch.no_grad():
        # [8, vocab]
        logp = torch.log_softmax(model(torch.tensor([ids + out]))[0, len(ids) - 1 : -1], -1)
    content = r.choices[0].logprobs.content
    assert len(content) == len(out)
    for j, (entry, token) in enumerate(zip(content, out)):
        assert entry.token == tok.decode([token], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(float(logp[j, token]), rel=1e-4, abs=1e-4)
        values, idx = logp[j].topk(5)
        assert [t.token for t in entry.top_logprobs] == [
            tok.decode([i], skip_special_tokens=False) for i in idx
        ]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            values.tolist(), rel=1e-4, abs=1e-4
        )
    # bytes are the token's own bytes: they join to the reply's UTF-8, even where a token splits a
    # character
    assert (
        bytes(b for e in content for b in e.bytes).decode("utf-8", "replace")
        == r.choices[0].message.content
    )


def test_openai_steering_through_extra_body(tiny, srv, client):
    url, _ = srv
    d, vectors, model, tok = tiny
    c = client(url)
    plain = c.chat.completions.create(model="m", messages=HI, max_tokens=10, temperature=0)
    replied = 0
    for steer, specs, kw in [
        ({"evil": 3}, ["evil:3.0"], {}),
        ({"humorous": "-0.5r", "evil": -1.5}, ["humorous:-0.5r", "evil:-1.5"], {}),
        (
            [{"vector": "evil", "coef": 2, "layer": 2, "positions": "all"}],
            ["evil:2"],
            dict(layer=2, positions="all"),
        ),
    ]:
        r = c.chat.completions.create(
            model="m", messages=HI, max_tokens=10, temperature=0, extra_body={"steer": steer}
        )
        out = reference(tiny, HI, 10, specs, **kw)
        assert r.choices[0].message.content == tok.decode(out)
        # the steering did something
        assert r.choices[0].message.content != plain.choices[0].message.content
        before, reply = gauge_reference_steered(tiny, HI, out, specs, kw)
        persona = r.choices[0].model_extra["persona"]["evil"]
        assert persona["before_reply"] == pytest.approx(before, abs=1e-4)
        # None: an empty reply
        assert persona["reply"] == (pytest.approx(reply, abs=1e-4) if out else None)
        replied += bool(out)
    assert replied >= 2


def gauge_reference_steered(tiny, messages, out, specs, kw):
    """The evil gauge on a steered reply: the reply as the unsteered model reads it (teacher
    forcing, no steering), as eval and chat measure it; the steered pass gives other numbers (the
    steering itself)."""
    d, vectors, model, tok = tiny
    steer = []
    for spec in specs:
        steer += pv.steering(
            [spec], model, vectors, kw.get("layer"), kw.get("positions", "response")
        )
    g = Gauge.from_file(
        vectors / "evil_response_avg_diff.safetensors", None, model.config.num_hidden_layers
    )
    ids = tok.encode_chat(messages)
    readings = []
    for interventions in ([], steer):
        cap = M.Capture()
        with torch.no_grad():
            model(
                torch.tensor([ids + out]),
                answer_start=torch.tensor([len(ids)]),
                steer=interventions,
                capture=cap,
                logits="none",
            )
        readings.append(
            (
                float(cap.prompt_last()[0, g.layer] @ g.unit),
                float(cap.answer_mean()[0, g.layer] @ g.unit),
            )
        )
    if any(
        s.layer <= g.layer for s in steer
    ):  # the steering shows in a steered pass: the reference is not one
        assert readings[0] != readings[1]
    return readings[0]


def test_sampling_n_seed_and_stop_strings(tiny, srv, client):
    url, _ = srv
    d, vectors, model, tok = tiny
    c = client(url)
    r = c.chat.completions.create(
        model="m", messages=NUMBERS, max_tokens=10, temperature=2, top_p=0.98, seed=7, n=3
    )
    for i, choice in enumerate(
        r.choices
    ):  # choice i samples with seed + i, as generate does with that seed
        assert choice.index == i
        assert choice.message.content == tok.decode(
            reference(tiny, NUMBERS, 10, temperature=2, top_p=0.98, seed=7 + i)
        )
    assert len({ch.message.content for ch in r.choices}) > 1
    full = tok.decode(reference(tiny, NUMBERS, 30))
    stop = full[13:16]
    assert len(stop) == 3 and stop in full
    for stream in (False, True):
        kw = dict(
            model="m", messages=NUMBERS, max_tokens=30, temperature=0, stop=[stop, "never there"]
        )
        if stream:
            text = "".join(
                ch.choices[0].delta.content or ""
                for ch in c.chat.completions.create(stream=True, **kw)
            )
        else:
            choice = c.chat.completions.create(**kw).choices[0]
            text = choice.message.content
            assert choice.finish_reason == "stop"
        assert text == full[: full.index(stop)]


def test_auth_and_models(tiny, client):
    openai = pytest.importorskip("openai")
    url, engine, server = start(tiny, api_key="s3cret")
    try:
        r = requests.get(f"{url}/models", timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").chat.completions.create(
                model="m", messages=HI, max_tokens=2
            )
        r = client(url, api_key="s3cret").chat.completions.create(
            model="m", messages=HI, max_tokens=2, temperature=0
        )
        assert r.choices[0].message.content == tiny[3].decode(reference(tiny, HI, 2))
        models = requests.get(
            f"{url}/models", headers={"Authorization": "Bearer s3cret"}, timeout=TIMEOUT
        ).json()
        assert models["data"][0]["persona_vectors"] == ["evil", "humorous"]
    finally:
        stop(engine, server)


# -------------------------------------------------------------------------------------------- judge
def test_judge_openai_backend_against_serve(tiny, srv, monkeypatch):
    """judge.py's OpenAI backend, pointed at serve by OPENAI_BASE_URL, reads the model's own top-20
    logprobs."""
    url, _ = srv
    d, vectors, model, tok = tiny
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # the random model puts little mass on numbers: score whatever mass there is, so that scores are
    # compared
    monkeypatch.setattr(J, "MIN_NUMBER_MASS", 1e-12)
    tables = {}
    aggregate = J.aggregate_logprobs
    monkeypatch.setattr(
        J, "aggregate_logprobs", lambda t: tables.setdefault(len(tables), t) and aggregate(t)
    )
    judge = J.make_judge(f"openai:{d}")
    assert isinstance(judge, J.OpenAIJudge)

    def expected(prompt):
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
        values, idx = logp.topk(20)
        table = {}
        for i, v in zip(idx.tolist(), values.tolist()):
            t = tok.decode([i], skip_special_tokens=False)
            table[t] = math.log(math.exp(table.get(t, -math.inf)) + math.exp(v))
        return table

    prompts = [f"Numbers: {i} {i + 1} {i + 2}" for i in range(6)] + [
        "What is 2 + 2?",
        "Rate it: 42",
    ]
    judge.workers = 1  # one request at a time, so the tables arrive in order
    got = [
        None if s != s else s for s in judge.score(prompts)
    ]  # NaN: neither a number nor a refusal
    for i, p in enumerate(prompts):
        want = expected(p)
        assert tables[i].keys() == want.keys()
        assert [tables[i][k] for k in want] == pytest.approx(
            list(want.values()), rel=1e-4, abs=1e-4
        )
        assert got[i] == (
            None if aggregate(want) is None else pytest.approx(aggregate(want), abs=1e-3)
        )
    assert sum(g is not None for g in got) >= 2


# ------------------------------------------------------------------------ one batch, many steerings
def test_one_batch_rows_with_different_steering_equal_each_alone(tiny, srv):
    """Rows of one batch, each with its own steering, sampling and limits, give what each gives
    alone."""
    url, engine = srv
    d, vectors, model, tok = tiny
    cases = [
        (HI, {"steer": {"evil": 3}}, ["evil:3.0"], {}),
        (NUMBERS, {}, [], {}),
        (HI, {"steer": {"humorous": "0.5r", "evil": -2}}, ["humorous:0.5r", "evil:-2.0"], {}),
        (
            NUMBERS,
            {"steer": [{"vector": "evil", "coef": 1.5, "layer": 3, "positions": "all"}]},
            ["evil:1.5"],
            dict(layer=3, positions="all"),
        ),
        (
            [{"role": "user", "content": "Hello there!"}],
            {"temperature": 0.8, "seed": 3, "steer": {"evil": 1}},
            ["evil:1.0"],
            dict(temperature=0.8, seed=3),
        ),
    ]
    jobs = []
    for i, (messages, extra, *_) in enumerate(cases):
        jobs.append(
            S.Job(
                engine.parse(
                    {"messages": messages, "max_tokens": 5 + 2 * i, "temperature": 0} | extra
                )
            )
        )
    # one batch, here, not on the worker
    engine.generate([S.Row(j, 0, j.req.steer, "cpu") for j in jobs])
    for i, (job, (messages, extra, specs, kw)) in enumerate(zip(jobs, cases)):
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        text = "".join(e[2]["text"] for e in events if e[0] == "delta")
        out = reference(tiny, messages, 5 + 2 * i, specs, **kw)
        assert text == tok.decode(out), i
        assert events[-1][0] == "finish" and events[-1][2]["tokens"] == len(out)


# ---------------------------------------------------------------------------------------- bad input
BAD = [
    (b"{not json", "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 40_000 + b"]" * 40_000, "not valid JSON here (nested too deep)"),  # was a 500
    ({"messages": "hi"}, "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be"),
    ({"max_tokens": "ten"}, "max_tokens must be a positive integer"),
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"stop": [1, 2]}, "stop must be a non-empty string or a list"),
    ({"stop": ""}, "stop must be a non-empty string or a list"),
    ({"stop": ["x", "y" * 1001], "max_tokens": 2}, "stop strings must be at most 1000 characters"),
    ({"seed": -1}, "seed must be an integer from 0"),
    ({"steer": {"greedy": 1}}, 'unknown vector "greedy"; this server has evil, humorous'),
    ({"steer": {"../../secret.safetensors": 1}}, "unknown vector"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "steer": {"evil": 1e999}}',
        "coef must be a finite number",
    ),
    ({"steer": {"evil": "nanr"}}, "the coefficient must be a finite number"),
    ({"steer": {"evil": "much"}}, "expected TRAIT:COEF"),
    ({"steer": [{"vector": "evil", "coef": 1, "layer": 9}]}, "layer must be a block 1..3"),
    ({"steer": [{"vector": "evil", "coef": 1, "positions": "middle"}]}, "positions must be one of"),
    ({"steer": "evil:1"}, "steer must be an object"),
    ({"n": 99}, "n must be between 1 and this server's limit of 4"),
    ({"max_tokens": 100_000}, "over this server's limit of 3000"),
    ({"logprobs": True, "top_logprobs": 25}, "top_logprobs must be an integer from 0 to 20"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"tools": [{"type": "function"}]}, "tools is not supported"),
    (
        {"messages": [{"role": "user", "content": "word " * 5000}]},
        "but this model's context is 4096",
    ),
    (
        {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 3000},
        "exceed this model's context",
    ),
    (b"x" * 100_001, "over this server's limit of 100000"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_a_one_line_400(tiny, srv, body, message):
    url, engine = srv
    data = body if isinstance(body, bytes) else json.dumps({"messages": HI} | body).encode()
    r = requests.post(
        f"{url}/chat/completions",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    ok = requests.post(
        f"{url}/chat/completions",
        json={"messages": HI, "max_tokens": 2, "temperature": 0},
        timeout=TIMEOUT,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == tiny[
        3
    ].decode(reference(tiny, HI, 2))


def test_unknown_endpoint_and_missing_length(srv):
    url, _ = srv
    r = requests.post(f"{url}/completions", json={"prompt": "hi"}, timeout=TIMEOUT)
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        reply = b"".join(iter(lambda: s.recv(65536), b"")).decode()  # until the server closes
    assert reply.startswith("HTTP/1.1 400") and "Content-Length header" in reply


# ----------------------------------------------------------------------------- clients that go away
def raw_request(url, body: dict) -> socket.socket:
    host, port = url.split("//")[1].split("/")[0].split(":")
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    return s


def wait_for(condition, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_client_leaving_frees_its_row(tiny, srv):
    url, engine = srv
    out = reference(tiny, HI, 200)
    # this prompt does not stop by itself: only the client's leaving can end its row early
    assert len(out) == 200
    for stream in (True, False):
        before = engine.stats["cancelled"]
        s = raw_request(
            url, {"messages": HI, "max_tokens": 3000, "temperature": 0, "stream": stream}
        )
        if stream:  # read until the first chunk has come: the request is under way
            seen = b""
            while b"data: " not in seen:
                chunk = s.recv(4096)
                assert chunk, "the server closed the stream"
                seen += chunk
        s.close()
        wait_for(lambda: engine.stats["cancelled"] == before + 1)
    r = requests.post(
        f"{url}/chat/completions",
        json={"messages": HI, "max_tokens": 3, "temperature": 0},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200


def test_closing_ends_requests_in_flight(tiny):
    """Shutting the engine down stops the running batch: its client gets a 503, not a hang."""
    url, engine, server = start(tiny)
    try:
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(
                requests.post,
                f"{url}/chat/completions",
                timeout=TIMEOUT,
                json={"messages": HI, "max_tokens": 3000, "temperature": 0},
            )
            wait_for(lambda: engine.stats["batches"] == 1)
            engine.close()
            r = reply.result(timeout=TIMEOUT)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------- load
def test_load_200_requests_16_clients(tiny, srv):
    """200 requests from 16 concurrent clients, each with its own prompt, steering and length: no
    error, and each reply equals its own request's greedy output computed alone. Batches form, with
    mixed steering."""
    url, engine = srv
    d, vectors, model, tok = tiny
    words = " ".join(CORPUS[:4]).split()
    requests_ = []
    for i in range(200):
        rnd = random.Random(i)
        content = f"{i}: " + " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 12)))
        steer = [
            {},
            {"evil": round(rnd.uniform(-3, 3), 2)},
            {"humorous": round(rnd.uniform(-3, 3), 2)},
            {"evil": round(rnd.uniform(-2, 2), 2), "humorous": "0.5r"},
        ][i % 4]
        requests_.append(
            (
                {
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 6 + i % 7,
                    "temperature": 0,
                    "steer": steer,
                },
                [
                    f"{k}:{float(v)!r}" if not isinstance(v, str) else f"{k}:{v}"
                    for k, v in steer.items()
                ],
            )
        )
    expected = [
        tok.decode(reference(tiny, body["messages"], body["max_tokens"], specs))
        for body, specs in requests_
    ]
    assert len(set(expected)) >= 120  # replies differ enough that a mix-up would show
    stats = dict(engine.stats)
    local, sessions = threading.local(), []

    def ask(body):
        if not hasattr(local, "session"):
            local.session = requests.Session()
            sessions.append(local.session)
        r = local.session.post(f"{url}/chat/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, [body for body, _ in requests_], timeout=600))
    finally:
        for session in sessions:
            session.close()
    assert got == expected
    assert engine.stats["rows"] - stats["rows"] == 200 and engine.stats["errors"] == 0
    assert engine.stats["max_rows"] > 1 and engine.stats["mixed_steering"] > stats["mixed_steering"]


# ------------------------------------------------------------------------------------- command line
def test_serve_command_line(tiny, tmp_path):
    """`python -m apps serve` started on port 0 answers, and Ctrl-C stops it."""
    d, vectors, model, tok = tiny
    root = Path(__file__).parent.parent
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from apps.__main__ import main; "
        "sys.exit(main(sys.argv[2:]))"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            str(root),
            "serve",
            "--model",
            str(d),
            "--vectors",
            str(vectors),
            "--port",
            "0",
            "--device",
            "cpu",
            "--quiet",
        ],
        stderr=subprocess.PIPE,
        text=True,  # Ctrl-C's default, also under a background run:
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline, line = time.monotonic() + TIMEOUT, ""
        while "serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            if select.select([proc.stderr], [], [], 1)[0]:
                line = proc.stderr.readline()
        url = line.split(" on ")[1].split()[0]
        assert "persona vectors: evil, humorous" in line
        r = requests.post(
            f"{url}/chat/completions",
            json={"messages": HI, "max_tokens": 4, "temperature": 0},
            timeout=TIMEOUT,
        )
        assert r.json()["choices"][0]["message"]["content"] == tok.decode(reference(tiny, HI, 4))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
