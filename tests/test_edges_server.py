"""Issue 17 for `serve` (support/server.py): nothing lost, nothing silent. Bad flags end in one line; the server's
own edges (shutdown with clients still connected, clients that leave or stall, too many connections, garbled
requests, auth schemes) get answers in the API's JSON and one log line each, never a traceback or a hang.

Every socket here is a client on 127.0.0.1 with a timeout, in bounded loops."""
import json
import socket
import threading

from test_server import HI, TIMEOUT, client, start, stop, tiny  # noqa: F401 (fixtures)


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
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
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
