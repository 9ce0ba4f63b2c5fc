"""Issue 17 for `serve` (apps/server.py): nothing lost, nothing silent. Bad flags end in one line;
the server's own edges (shutdown with clients still connected, clients that leave or stall, too many
connections, garbled requests, auth schemes) get answers in the API's JSON and one log line each,
never a traceback or a hang.

Every socket here is a client on 127.0.0.1 with a timeout, in bounded loops."""

import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from test_server import (  # noqa: F401 (fixtures)
    HI,
    TIMEOUT,
    client,
    raw_request,
    start,
    stop,
    tiny,
    wait_for,
)
from tiny import run_bad, tree

from apps import __main__ as apps_cli
from apps import server as S
from support import UserError, checkpoint

# (arguments, exit code, what the one-line message must say); {d} = the tiny model, {r} = its folder
CASES = [
    ("serve --model {d} --port 70000", 2, "--port: must be <= 65535, not 70000"),
    ("serve --model {d} --port -1", 2, "--port: must be >= 0"),
    ("serve --model {d} --max-batch 0", 2, "--max-batch: must be >= 1"),
    ("serve --model {d} --max-n 0", 2, "--max-n: must be >= 1"),
    ("serve --model {d} --max-connections 0", 2, "--max-connections: must be >= 1"),
    ("serve --model {d} --batch-wait -1", 2, "--batch-wait: must be >= 0"),
    ("serve --model {d} --max-body 0", 2, "--max-body: must be >= 1"),
    ("serve --model {d} --vectors {r}/nonexistent/dir", 1, "--vectors"),
    ("serve --model {d} --vectors {d}/config.json", 1, "is not a directory"),
]


@pytest.mark.parametrize("argv, code, message", CASES, ids=[c[0].split("{d} ")[1] for c in CASES])
def test_bad_serve_flags(tiny, argv, code, message, monkeypatch, capsys, tmp_path):
    d, vectors, model, tok = tiny
    root = d.parent
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        checkpoint,
        "load",
        lambda *a, **k: pytest.fail("the model loaded before the flags were checked"),
    )
    before = tree(root)
    err = run_bad(apps_cli.main, argv.format(d=d, r=root).split(), code, capsys)
    assert message in err[-1], err
    usage_then_error = err[-1].startswith("python -m apps serve: error:")
    assert len(err) == 1 if code == 1 else usage_then_error
    assert list(tmp_path.iterdir()) == [] and tree(root) == before


def test_max_batch_0_names_max_batch(tiny):
    d, vectors, model, tok = tiny
    with pytest.raises(UserError, match="--max-batch") as e:
        S.Engine(model, tok, vectors, max_batch=0)
    assert "--max-n" not in str(e.value)


def handler_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def connect(url) -> socket.socket:
    host, port = url.split("//")[1].split("/")[0].split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


def read_reply(s: socket.socket) -> tuple[str, dict]:
    """One HTTP reply with a Content-Length from s -> (status line and headers, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head.decode(), json.loads(body)


# ---------------------------------------------------------------- 0: shutdown with clients still in
def test_closing_the_server_ends_keep_alive_connections_and_joins_their_threads(tiny, client):
    """A client that keeps its connection open does not keep a handler thread (holding the model's
    tensors) alive after server_close: at interpreter exit such a thread crashed the process
    (terminate called, exit 134)."""
    others = handler_threads()  # of other tests' servers, if any
    url, engine, server = start(tiny)
    c = client(url)  # the openai client keeps its connection open between requests
    assert c.chat.completions.create(model="m", messages=HI, max_tokens=2, temperature=0).choices
    s = connect(url)
    try:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_reply(s)
        assert head.startswith("HTTP/1.1 200") and body["data"]
        # both connections are open, each with its thread
        assert len(handler_threads() - others) == 2
        stop(engine, server)
        assert handler_threads() - others == set()
        assert s.recv(1) == b""  # the server closed the connection
    finally:
        s.close()


# ---------------------------------------------------------------------- 8: clients that leave early
def reset(s: socket.socket) -> None:
    """Close s with a TCP reset (as a killed client's connection ends)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_each_client_that_leaves_is_one_log_line(tiny, capsys):
    url, engine, server = start(tiny, quiet=False)
    capsys.readouterr()
    try:
        # a body that never comes in full: the server is reading it when the client resets
        s = connect(url)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Length: 100\r\n\r\n{"messages"'
        )
        reset(s)
        for stream in (True, False):  # a long reply, left before it ends
            cancelled = engine.stats["cancelled"]
            s = raw_request(
                url, {"messages": HI, "max_tokens": 3000, "temperature": 0, "stream": stream}
            )
            if stream:
                assert s.recv(4096)  # the stream has begun
            s.close()
            wait_for(lambda: engine.stats["cancelled"] == cancelled + 1)
    finally:
        stop(engine, server)  # joins every handler thread: all they logged is in
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "the client went away" in line]) == 3, err


# ------------------------------------------------------------- 18: stalled bodies, too many clients
def test_a_stalled_body_gets_408_and_its_connection_closes(tiny):
    url, engine, server = start(tiny, body_timeout=0.5)
    try:
        with connect(url) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b'Content-Length: 100\r\n\r\n{"mess'
            )
            head, body = read_reply(s)
            assert (
                head.startswith("HTTP/1.1 408")
                and "the request body stalled" in body["error"]["message"]
            )
            assert s.recv(1) == b""  # and the connection is closed
        r = requests.post(
            f"{url}/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=TIMEOUT
        )
        assert r.status_code == 200
    finally:
        stop(engine, server)


def get_models(url) -> tuple[str, dict]:
    with connect(url) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_reply(s)


def test_connections_beyond_the_limit_get_503(tiny):
    """At the limit, with no connection idle, a new client is answered 503 at once."""
    url, engine, server = start(tiny, max_connections=2, body_timeout=60)
    held = [connect(url) for _ in range(2)]  # each owes its first request (60 s): not idle
    try:
        wait_for(lambda: len(server.connections) == 2)
        for _ in range(3):
            head, body = get_models(url)
            assert head.startswith("HTTP/1.1 503") and "Content-Type: application/json" in head
            assert (
                body["error"]["type"] == "server_error"
                and "limit of 2 open connections" in body["error"]["message"]
            )
        assert len(server.connections) == 2
        held.pop().close()  # a place frees up: the next client is served
        wait_for(lambda: get_models(url)[0].startswith("HTTP/1.1 200"))
    finally:
        for s in held:
            s.close()
        stop(engine, server)


def test_at_the_limit_a_new_client_takes_the_place_of_the_longest_idle_one(tiny):
    """Idle keep-alive connections do not hold the server's places for their 120 s: at the
    limit, the one idle longest is closed (as its idle time running out would close it) and the
    new client is served; its own next request is refused by no one but a closed socket."""
    url, engine, server = start(tiny, max_connections=2)
    held = [connect(url) for _ in range(2)]
    try:
        for i, s in enumerate(held):  # two keep-alive connections, served, kept open, idle
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(s)[0].startswith("HTTP/1.1 200")
            wait_for(lambda i=i: len(server.idle_connections) == i + 1)  # the first is idle longest
        head, body = get_models(url)  # a third client, at the limit
        assert head.startswith("HTTP/1.1 200") and body["data"]
        held[0].settimeout(10)
        assert held[0].recv(1) == b""  # the first (longest idle) was closed to make room
        held[1].sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # the other still works
        assert read_reply(held[1])[0].startswith("HTTP/1.1 200")
        assert len(server.connections) <= 2
    finally:
        for s in held:
            s.close()
        stop(engine, server)


# --------------------------------------------------------- 20: every error in JSON; the auth scheme
@pytest.fixture(scope="module")
def srv_edges(tiny):
    url, engine, server = start(tiny, api_key="s3cret")
    yield url
    stop(engine, server)


@pytest.mark.parametrize(
    "request_line, status, message",
    [
        (b"garbage", 400, "Bad request syntax"),
        (b"GET /v1/models garbage/1.1", 400, "Bad request version"),
        (b"GET /v1/models HTTP/2.0", 505, "Invalid HTTP version"),
        (b"PUT /v1/models HTTP/1.1", 501, "Unsupported method ('PUT')"),
    ],
)
def test_garbled_requests_get_json_errors(srv_edges, request_line, status, message):
    with connect(srv_edges) as s:
        s.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        head, body = read_reply(s)
        assert head.startswith(f"HTTP/1.1 {status}") and "Content-Type: application/json" in head
        assert message in body["error"]["message"] and set(body["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        assert s.recv(1) == b""


@pytest.mark.parametrize(
    "authorization, status",
    [
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),
        ("BEARER  s3cret", 200),
        ("Bearer wrong", 401),
        ("Basic s3cret", 401),
        ("s3cret", 401),
        ("Bearer s3cret2", 401),
        ("Bearer s\xe9cret", 401),
    ],
)
def test_auth_scheme_is_case_insensitive(srv_edges, authorization, status):
    r = requests.get(
        f"{srv_edges}/models", headers={"Authorization": authorization}, timeout=TIMEOUT
    )
    assert r.status_code == status, r.text
    assert status == 200 or r.json()["error"]["code"] == "invalid_api_key"


# ------------------------------------------------------ issue 26: half a request, a garbled length
@pytest.mark.parametrize(
    "head",
    [
        # the request line, one header, nothing
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost:",  # half a header
        b"GET /v1/mod",  # half a request line
    ],
    ids=["one header", "half a header", "half a request line"],
)
def test_a_stalled_request_head_gets_408_and_frees_its_connection(tiny, head):
    """Once a request has begun, its headers must keep coming as its body must: a client that stops
    holds its connection slot for body_timeout, not for the idle connection's 120 s."""
    url, engine, server = start(tiny, body_timeout=0.5, max_connections=1)
    try:
        with connect(url) as s:
            s.settimeout(10)  # a server that waits 120 s fails here
            s.sendall(head)
            status, body = read_reply(s)
            assert status.startswith("HTTP/1.1 408") and "Content-Type: application/json" in status
            message = "the request stalled before its headers ended: nothing came for 0.5 s"
            assert message in body["error"]["message"]
            assert s.recv(1) == b""
        wait_for(lambda: get_models(url)[0].startswith("HTTP/1.1 200"))  # the one slot is free
    finally:
        stop(engine, server)


def test_a_new_connection_that_sends_nothing_gets_408_and_frees_its_slot(tiny):
    """A client that opens a connection and sends nothing is a stalled request too: 64 of them
    would otherwise hold every slot for the idle connection's 120 s."""
    url, engine, server = start(tiny, body_timeout=0.5, max_connections=1)
    try:
        with connect(url) as s:
            s.settimeout(10)  # a server that waits 120 s fails here
            status, body = read_reply(s)
            assert status.startswith("HTTP/1.1 408") and "Content-Type: application/json" in status
            assert "no request came on this new connection for 0.5 s" in body["error"]["message"]
            assert s.recv(1) == b""
        wait_for(lambda: get_models(url)[0].startswith("HTTP/1.1 200"))  # the one slot is free
    finally:
        stop(engine, server)


@pytest.mark.parametrize(
    "headers, message",
    [
        # superscript two (str.isdigit() holds), an Arabic-Indic three as Latin-1 reads it, 5001
        # digits (int() refuses over 4300)
        (
            b"Content-Length: \xb2",
            "the Content-Length header must be a number of bytes, not '\xb2'",
        ),
        (b"Content-Length: \xd9\xa3", "must be a number of bytes"),
        (b"Content-Length: 1" + b"0" * 5000, "over this server's limit"),
        (
            b"Content-Length: 2\r\nContent-Length: 200",
            "conflicting Content-Length headers (2, 200)",
        ),
        (b"Content-Length: 200\r\nContent-Length: 2", "conflicting Content-Length headers"),
        (b"Content-Length: +2", "must be a number of bytes"),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 2", "Transfer-Encoding is not supported"),
    ],
    ids=[
        "superscript two",
        "arabic three",
        "5001 digits",
        "2 then 200",
        "200 then 2",
        "+2",
        "chunked and length",
    ],
)
def test_a_bad_content_length_is_a_400_and_no_traceback(tiny, headers, message, capsys):
    """RFC 9112 6.3: a request whose body length is unclear is refused with 400 and its connection
    closed."""
    url, engine, server = start(tiny, quiet=False)
    try:
        with connect(url) as s:
            s.settimeout(10)
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers
            s.sendall(head + b"\r\n\r\n{}")
            status, body = read_reply(s)
            assert status.startswith("HTTP/1.1 400") and message in body["error"]["message"], body
            assert body["error"]["type"] == "invalid_request_error"
            assert s.recv(1) == b""
    finally:
        stop(engine, server)
    assert "Traceback" not in capsys.readouterr().err


def test_the_same_content_length_twice_is_one(tiny):
    url, engine, server = start(tiny)
    data = json.dumps({"messages": HI, "max_tokens": 2, "temperature": 0}).encode()
    length = b"Content-Length: " + str(len(data)).encode() + b"\r\n"
    try:
        with connect(url) as s:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + length * 2
            s.sendall(head + b"\r\n" + data)
            status, body = read_reply(s)
            assert status.startswith("HTTP/1.1 200") and body["choices"], body
    finally:
        stop(engine, server)


# ---------------------------------------------- issue 26: Ctrl-C with replies still being written
def test_ctrl_c_ends_every_reply_in_flight_before_the_connections_close(tiny):
    """On SIGINT, a stream in flight ends with an error chunk and [DONE], a plain request with a
    503, and only then do the connections close (server_close ran before engine.close: the streams
    were cut with neither)."""
    d, vectors, model, tok = tiny
    root = Path(__file__).parent.parent
    argv = [
        sys.executable,
        "-m",
        "apps",
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
    ]
    proc = subprocess.Popen(
        argv,
        cwd=root,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        url = serving_url(proc)
        ask = {"messages": HI, "max_tokens": 1000, "temperature": 0}  # serve's limit is 1024
        stream = raw_request(url, ask | {"stream": True})
        plain = raw_request(url, ask)
        seen = b""
        while seen.count(b"data: ") < 3:  # the stream is under way
            chunk = stream.recv(65536)
            assert chunk, seen
            seen += chunk
        proc.send_signal(signal.SIGINT)
        seen += b"".join(iter(lambda: stream.recv(65536), b""))  # until the server closes it
        events = [line[6:] for line in seen.decode().split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[-2])["error"]["message"] == "the server is shutting down"
        status, body = read_reply(plain)
        assert status.startswith("HTTP/1.1 503") and "shutting down" in body["error"]["message"]
        assert proc.wait(timeout=TIMEOUT) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def serving_url(proc) -> str:
    """The URL a `serve` subprocess prints when it listens."""
    deadline, line = time.monotonic() + TIMEOUT, ""
    while "serving" not in line:
        assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
        if select.select([proc.stderr], [], [], 1)[0]:
            line = proc.stderr.readline()
    return line.split(" on ")[1].split()[0]
