"""Issue 17 for `serve` (support/server.py): nothing lost, nothing silent. Bad flags end in one line; the server's
own edges (shutdown with clients still connected, clients that leave or stall, too many connections, garbled
requests, auth schemes) get answers in the API's JSON and one log line each, never a traceback or a hang.

Every socket here is a client on 127.0.0.1 with a timeout, in bounded loops."""
import hashlib
import json
import socket
import threading

import pytest

import model as M
import persona_vectors as pv
from support import UserError
from support import server as S
from test_server import HI, TIMEOUT, client, start, stop, tiny  # noqa: F401 (fixtures)

# (arguments, exit code, what the one-line message must say); {d} = the tiny model, {r} = its folder
CASES = [
    ("serve --model {d} --port 70000", 2, "--port: must be <= 65535, not 70000"),
    ("serve --model {d} --port -1", 2, "--port: must be >= 0"),
    ("serve --model {d} --max-batch 0", 2, "--max-batch: must be >= 1"),
    ("serve --model {d} --max-n 0", 2, "--max-n: must be >= 1"),
    ("serve --model {d} --batch-wait -1", 2, "--batch-wait: must be >= 0"),
    ("serve --model {d} --max-body 0", 2, "--max-body: must be >= 1"),
    ("serve --model {d} --vectors {r}/nonexistent/dir", 1, "--vectors"),
    ("serve --model {d} --vectors {d}/config.json", 1, "is not a directory"),
]


def tree(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("argv, code, message", CASES, ids=[c[0].split("{d} ")[1] for c in CASES])
def test_bad_serve_flags(tiny, argv, code, message, monkeypatch, capsys, tmp_path):
    d, vectors, model, tok = tiny
    root = d.parent
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(M, "load", lambda *a, **k: pytest.fail("the model loaded before the flags were checked"))
    before = tree(root)
    args = argv.format(d=d, r=root).split()
    if code == 2:
        with pytest.raises(SystemExit) as e:
            pv.main(args)
        got = e.value.code
    else:
        got = pv.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code
    assert "Traceback" not in "\n".join(err)
    assert message in err[-1], err
    assert len(err) == 1 if code == 1 else err[-1].startswith("persona_vectors.py serve: error:")  # after usage
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
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head.decode(), json.loads(body)


# ------------------------------------------------------------------------------ 0: shutdown with clients still in
def test_closing_the_server_ends_keep_alive_connections_and_joins_their_threads(tiny, client):
    """A client that keeps its connection open does not keep a handler thread (holding the model's tensors) alive
    after server_close: at interpreter exit such a thread crashed the process (terminate called, exit 134)."""
    others = handler_threads()  # of other tests' servers, if any
    url, engine, server = start(tiny)
    c = client(url)  # the openai client keeps its connection open between requests
    assert c.chat.completions.create(model="m", messages=HI, max_tokens=2, temperature=0).choices
    s = connect(url)
    try:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_reply(s)
        assert head.startswith("HTTP/1.1 200") and body["data"]
        assert len(handler_threads() - others) == 2  # both connections are open, each with its thread
        stop(engine, server)
        assert handler_threads() - others == set()
        assert s.recv(1) == b""  # the server closed the connection
    finally:
        s.close()
