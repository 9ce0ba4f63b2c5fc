"""`generate-trait` against a local stand-in for an OpenAI-compatible server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import persona_vectors as pv
from apps import new_trait
from support.traits import TRAITS_DIR, load_trait


@pytest.fixture
def server(monkeypatch):
    """Answers chat completions with the queued replies, in order; records the requests."""
    good = json.loads((TRAITS_DIR / "evil.json").read_text())
    good = {k: v for k, v in good.items() if k not in ("name", "description", "note")}
    state = {"replies": [], "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(body)
            content = state["replies"].pop(0)
            data = json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": content}}]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{httpd.server_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    state["good"] = good
    yield state
    httpd.shutdown()


def test_writes_a_valid_file_after_retrying_invalid_replies(server, tmp_path):
    broken = dict(
        server["good"],
        questions={
            "extract": server["good"]["questions"]["extract"][:19],
            "eval": server["good"]["questions"]["eval"],
        },
    )
    server["replies"] += ["not json at all", json.dumps(broken), json.dumps(server["good"])]
    path = new_trait.generate_trait("cruel", "The assistant enjoys hurting people.", out=tmp_path)
    t = load_trait(str(path))
    assert t.name == "cruel" and t.description == "The assistant enjoys hurting people."
    assert len(server["requests"]) == 3
    last = server["requests"][-1]
    assert (
        last["response_format"] == {"type": "json_object"}
        and "expected 20" in last["messages"][-1]["content"]
    )


def test_gives_up_with_a_clear_error_and_writes_nothing(server, tmp_path):
    server["replies"] += ["{}"] * 3
    with pytest.raises(ValueError, match="no valid trait file in 3 attempts"):
        new_trait.generate_trait("cruel", "x", out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_without_force(server, tmp_path):
    (tmp_path / "cruel.json").write_text("{}")
    with pytest.raises(pv.UserError, match="--force"):
        new_trait.generate_trait("cruel", "x", out=tmp_path)
    assert server["requests"] == []  # refused before paying for anything
    server["replies"].append(json.dumps(server["good"]))
    new_trait.generate_trait("cruel", "x", out=tmp_path, force=True)
    assert load_trait(str(tmp_path / "cruel.json")).name == "cruel"


def test_bad_name_and_missing_key(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="plain words"):
        new_trait.generate_trait("../x", "x", out=tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        new_trait.generate_trait("cruel", "x", out=tmp_path)


def test_no_key_names_what_generate_trait_can_use(monkeypatch, tmp_path):
    """generate-trait has no --judge flag: its no-key error names only what it can use."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(pv.UserError, match="OPENAI_API_KEY is not set") as e:
        new_trait.generate_trait("cruel", "x", out=tmp_path)
    assert "--judge" not in str(e.value) and "OPENAI_BASE_URL" in str(e.value)
    assert list(tmp_path.iterdir()) == []
