"""Files the project reads and writes: atomic writes, CSV, the persona-vector files (their name, a
sweep's result, saving, loading, fit) and conversation files (JSONL, one {"messages": [...]} per
line)."""

import contextlib
import csv
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from support import UserError
from support.limits import LABEL_BYTES, NAME_BYTES, TEXT_FILE_BYTES

# read once, at import: os.umask can only be read by setting it, which races with threads
UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename into place: an interrupted run never leaves a half-written
    file.

    tmp_path has the file's own name, inside a private folder `.<name>.<pid>-XXXX.tmp` beside the
    file: a library that writes its own temporary next to the path it is given (safetensors 0.8's
    `.tmpXXXXXX`) writes it in there, so whatever a kill -9 leaves is a temporary of ours, and the
    next write of the same file removes it (remove_stale_temps). The file gets the usual
    permissions (0666 less the umask), not a private 0600.
    """
    path = Path(path)
    _note((path.parent, *path.parent.parents))  # the folders made for it are the run's (made_dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    prefix = f".{path.name}.{os.getpid()}-"
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".tmp"))
    tmp = folder / path.name
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def temp_path(path: Path) -> Path:
    """The temporary name this process writes `path` under before renaming it into place:
    `.<name>.<pid>.tmp` beside it. The pid lets a later run tell a leftover of a killed process (see
    remove_stale_temps)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


# the middle of a temporary's name: <pid> (temp_path) or <pid>-XXXX (atomic_write)
TEMP_PID = re.compile(r"(\d+)(-\w+)?")


def remove_stale_temps(path: Path, max_age: float = 3600.0) -> list[Path]:
    """Delete the temporaries (files or folders) of `path` that killed processes left: those whose
    process is gone, or older than max_age seconds (its pid may have been reused). Another live
    run's temporary is left alone."""
    path, removed = Path(path), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = TEMP_PID.fullmatch(tmp.name[len(path.name) + 2 : -len(".tmp")])
        if not pid or int(pid[1]) == os.getpid():
            continue
        if _alive(int(pid[1])) and time.time() - tmp.lstat().st_mtime < max_age:
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists under another user (or cannot tell): keep its files
        return True
    return True


LOCK = ".lock"  # the lock file of a directory a run writes (see locked)


@contextmanager
def locked(directory: Path, what: str = "--out", name: str = LOCK):
    """Hold `directory` for this run: an exclusive flock on the file `name` in it (the directory is
    made if need be). A second run on the same directory stops at once with one line naming the
    holder (its pid and command) and changes nothing. The kernel releases a flock when its process
    dies, so a lock file left by a killed run blocks nothing; at the end the file and the folders
    made for it (when left empty) are removed."""
    directory = Path(directory)
    made = [p for p in [directory, *directory.parents] if not p.exists()]  # deepest first
    check_writable(directory, what)
    directory.mkdir(parents=True, exist_ok=True)  # removed again at the end when left empty
    fd = _lock(directory / name, what)
    try:
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv).replace("\n", " ")
        os.write(fd, f"pid {os.getpid()}: {command}\n".encode(errors="replace"))
        yield directory
    finally:
        (directory / name).unlink(missing_ok=True)  # while held: one that opened it now retries
        os.close(fd)
        for d in made:
            try:
                d.rmdir()  # only ever an empty directory
            except OSError:
                break


def _lock(path: Path, what: str) -> int:
    """-> a file descriptor holding the flock on `path`, created if need be; a UserError when
    another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            holder = holder if len(holder) <= 200 else holder[:200] + " ..."
            os.close(fd)
            raise UserError(
                f"{path.parent} is in use by another run ({holder}): wait until it ends, or choose "
                f"another {what}"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file just before we locked it: lock the new one


def read_json(path: Path):
    """The parsed JSON of a file; a missing, unreadable or malformed file is a UserError that names
    it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None


def check_writable(out: Path, option: str = "--out") -> None:
    """Fail now, not after the work, when the directory `out` cannot be made or written. Nothing is
    created: its nearest existing folder is tried, and the folders missing below it are noted in
    the open made_dirs scopes (a failed run removes them again when it left them empty)."""
    out = Path(out)
    missing = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    nearest = out.parents[len(missing) - 1] if missing else out
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror}): choose another {option}") from None
    _note(missing)


def check_output(
    path: Path, force: bool = False, inputs=(), option: str = "--out", taken=()
) -> Path:
    """Fail now, before the work, when the file `path` cannot be written: a directory, an input of
    this run or another of its outputs (`taken`: paths, or {path: what it is}; neither is ever
    written over, even with --force), an existing file without --force, or a folder that cannot be
    written (its nearest existing one is tried: nothing is created before the work)."""
    path = Path(path)
    check_name_length(path, option)  # "File name too long" after the work would lose it
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory: give a file name")
    if any(path.resolve() == Path(i).resolve() for i in inputs if i):
        raise UserError(
            f"{option} {path} is an input of this run and is never written over: "
            "choose another file"
        )
    named = taken if isinstance(taken, dict) else dict.fromkeys(taken)
    for other, what in named.items():
        if other and path.resolve() == Path(other).resolve():
            raise UserError(
                f"{option} {path} is {what or 'another output'} of this run ({other}), never "
                f"written over by another: choose another {option}"
            )
    if path.exists() and not force:
        raise UserError(f"{path} exists: choose another {option} or pass --force to overwrite it")
    check_writable(path.parent, option)
    return path


# The folders a run makes for its outputs: made only when there is something to write in them
# (atomic_write makes a file's folder), and removed again by a run that fails while they are empty.

_scopes: list[set[Path]] = []  # the open made_dirs scopes, innermost last


def _note(dirs) -> None:
    """Note, in every open made_dirs scope, the folders among `dirs` that do not exist (yet)."""
    if not _scopes:
        return
    missing = {Path(d).absolute() for d in dirs if not Path(d).exists()}
    for scope in _scopes:
        scope |= missing


@contextlib.contextmanager
def made_dirs(*paths):
    """A run's scope for the folders it makes: those missing when it starts among `paths` and their
    parents, and those that check_writable, check_output and atomic_write find missing within it.
    When the run fails (any exception, Ctrl-C included), each of them that exists and is empty is
    removed, innermost first: a failed run leaves no empty folder behind, and never removes one
    that existed before it or that holds a file. -> the set of noted folders (absolute paths)."""
    scope = set()
    _scopes.append(scope)
    _note(d for p in paths for d in (Path(p), *Path(p).parents))
    try:
        yield scope
    except BaseException:
        for d in sorted(scope, key=lambda d: len(d.parts), reverse=True):
            try:
                d.rmdir()  # only ever an empty folder
            except OSError:  # not empty (the run wrote there, or another one did), or never made
                pass
        raise
    finally:
        del _scopes[[s is scope for s in _scopes].index(True)]  # sets compare by value


# a name becomes a file name: no separator, no leading dot, no "..", no ""
NAME_RE = re.compile(r"\w[\w.-]{0,99}")


def check_name(name: str, flag: str = "--name") -> str:
    """A name that becomes part of a file name (e.g. --name of import-gguf) must be just a name,
    never a path."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise UserError(
            f"{flag} {name!r}: a name is up to 100 letters, digits, '_', '.' or '-' (not a path), "
            "starting with a letter or digit"
        )
    return name


def check_name_length(path: Path, option: str = "--out") -> None:
    """No name in `path` longer than a file system takes (NAME_BYTES): "File name too long" after
    the work would lose it."""
    for part in Path(path).parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_BYTES:
            raise UserError(
                f"{option}: the name {part[:40]}... is {len(part.encode())} bytes, "
                f"beyond the {NAME_BYTES} a file name may have: choose a shorter one"
            )


def check_output_dir(path: Path, inputs=(), option: str = "--out") -> Path:
    """Fail now, before the work, when the folder `path` cannot hold a run's files: a name too
    long, an existing file (an input of this run or not), or a folder that cannot be written (its
    nearest existing one is tried). Nothing is created."""
    path = Path(path)
    check_name_length(path, option)
    if any(path.resolve() == Path(i).resolve() for i in inputs if i):
        raise UserError(f"{option} {path} is an input of this run: choose a folder")
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder: choose another {option}")
    nearest = next(p for p in (path, *path.parents) if p.exists())
    if not nearest.is_dir():
        raise UserError(
            f"{option} {path}: {nearest} is a file, not a folder: choose another {option}"
        )
    # tries `nearest`; notes the folders missing below it for made_dirs
    check_writable(path, option)
    return path


def short_label(label: str) -> str:
    """A part of an output name built from the arguments (e.g. several --cap specs), at most
    LABEL_BYTES: a longer one keeps its start and ends in a hash of the whole, so that distinct
    labels stay distinct."""
    if len(label.encode("utf-8")) <= LABEL_BYTES:
        return label
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:12]
    head = label.encode("utf-8")[: LABEL_BYTES - 13].decode("utf-8", "ignore")
    return f"{head}-{digest}"


# Text inputs: every text file a command reads (prompts, questions, JSONL conversations) is checked
# by check_text before the command runs (support.cli.check_paths); read whole by read_text, or
# streamed as UTF-8 (jsonl_conversations).


def check_text(path, option: str = "") -> Path:
    """A text input -> its path, checked whole before any work: it exists, is a file, can be
    read, and is UTF-8 (streamed: a large JSONL costs a read, not its size in memory)."""
    path, label = Path(path), (option + " " if option.startswith("-") else "")
    if not path.exists():
        raise UserError(f"{label}{path} does not exist")
    if not path.is_file():
        raise UserError(f"{label}{path} is not a file: give a text file")
    fix, lines = "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)", 0
    try:
        with open(path, encoding="utf-8") as f:  # strict: the first byte that is not UTF-8 fails
            while text := f.read(1 << 20):
                lines += text.count("\n")
    except UnicodeDecodeError as e:
        line = lines + e.object[: e.start].count(b"\n") + 1  # e.object: the bytes being decoded
        raise UserError(
            f"{label}{path} is not UTF-8 text ({e.reason} at line {line}): {fix}"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {label}{path} ({e.strerror})") from None
    return path


def read_text(path, option: str = "") -> str:
    """The one reader of a text file read whole: UTF-8, at most TEXT_FILE_BYTES, errors as one
    line naming the file and the fix."""
    path = check_text(path, option)
    size = path.stat().st_size
    if size > TEXT_FILE_BYTES:
        raise UserError(
            f"{option + ' ' if option else ''}{path} is {size} bytes, beyond the "
            f"{TEXT_FILE_BYTES} a text file read whole may have: split it"
        )
    return path.read_text(encoding="utf-8")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Rows as CSV with these columns (other keys left out), written atomically."""

    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# Persona-vector files: tensor "vector" [num_layers + 1, hidden] (hidden index 0 = embeddings,
# L = output of block L) and JSON-encoded metadata, named like the official repository's files.

# the official file names: <trait>_<variant>_diff
VARIANTS = ("response_avg", "prompt_avg", "prompt_last")
# the paper's vector, the one every command uses by default
SUFFIX = "_response_avg_diff.safetensors"


def default_vectors_dir(model_name: str) -> Path:
    """vectors/<model name>/: where extract writes and every other command looks."""
    return Path("vectors") / Path(str(model_name).rstrip("/")).name


def vector_path(vectors_dir: Path, trait: str, variant: str = "response_avg") -> Path:
    return Path(vectors_dir) / f"{trait}_{variant}_diff.safetensors"


def save_batch(path: Path, rows: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    """A finished batch of a pipeline's answers: its rows as JSON metadata beside their
    activations, atomically."""
    atomic_write(
        path,
        lambda p: save_file(
            {k: v.cpu().contiguous() for k, v in tensors.items()},
            p,
            metadata={"rows": json.dumps(rows)},
        ),
    )


def load_batch(path: Path, keys: list[str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A batch written by save_batch -> (its rows, its tensors named by keys); a damaged file is a
    UserError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["rows"]), {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise UserError(
            f"{path} is damaged ({e}): delete it and run the same command again"
        ) from None


def vector_file(name: str, vectors_dir: Path, context: str = "", check: bool = True) -> Path:
    """A trait name (its vector in vectors_dir) or a .safetensors path -> the file, checked to
    exist unless not `check` (the error message starts with `context`, e.g. the flag that named
    it)."""
    path = Path(name) if name.endswith(".safetensors") else vector_path(vectors_dir, name)
    if check and not path.is_file():
        raise UserError(
            context
            + (
                f"{path} does not exist"
                if name.endswith(".safetensors")
                else f"no vector file {path}; run `extract {name}` first"
            )
        )
    return path


def traits_in(vectors_dir: Path) -> list[str]:
    """The traits that have a (response_avg) vector in a directory, sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in Path(vectors_dir).glob("*" + SUFFIX))


def other_vectors(vectors_dir: Path, trait: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every other trait's vector in the directory with the shape of `like` (the cross-trait
    controls)."""
    others = {
        o: load_vector(vector_path(vectors_dir, o))[0] for o in traits_in(vectors_dir) if o != trait
    }
    return {o: v for o, v in others.items() if v.shape == like.shape}


def save_vector(path: Path, vector: torch.Tensor, meta: dict) -> Path:
    atomic_write(
        path,
        lambda p: save_file(
            {"vector": vector.float().contiguous()},
            p,
            metadata={k: json.dumps(v) for k, v in meta.items()},
        ),
    )
    return path


def load_vector(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A vector file of this project -> (tensor [L + 1, hidden], metadata with JSON values
    decoded)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no vector file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {}
            for k, v in (f.metadata() or {}).items():
                try:
                    meta[k] = json.loads(v)
                except json.JSONDecodeError:
                    # metadata written by other tools, e.g. {"format": "pt"}
                    meta[k] = v
            if "vector" not in f.keys():
                raise UserError(
                    f"{path} has no tensor 'vector' (it has {', '.join(f.keys()) or 'none'}): "
                    "is it a persona-vector file?"
                )
            vec = f.get_tensor("vector")
    except SafetensorError as e:
        raise UserError(
            f"cannot read {path} ({e}): the file is truncated or not safetensors; extract it again"
        ) from None
    if vec.dim() != 2 or not torch.isfinite(vec).all():
        raise UserError(
            f"{path}: expected a finite [num_layers + 1, hidden] tensor, got {tuple(vec.shape)}"
            + ("" if torch.isfinite(vec).all() else " with non-finite values")
        )
    return vec.float(), meta


def check_fits(
    vec: torch.Tensor, meta: dict, path: Path, num_layers: int, hidden: int, model=None
) -> None:
    """The model-fit check: a vector must be [num_layers + 1, hidden] for the model it is used
    with; given that model (loaded, or its name), a vector recorded for another model also gets a
    warning (see check_model)."""
    if tuple(vec.shape) != (num_layers + 1, hidden):
        raise UserError(
            f"{path} is [{vec.shape[0]}, {vec.shape[1]}] "
            f"(extracted from {meta.get('model', '?')}), but "
            f"this model needs [{num_layers + 1}, {hidden}]: use a vector extracted from this model"
        )
    if model is not None:
        check_model(meta, path, model)


def check_directions(vec: torch.Tensor, layers: list[int], path: Path) -> None:
    """A direction to cap or ablate along at each of `layers`: a zero row has no unit vector."""
    for layer in layers:
        if not vec[layer].norm() > 0:
            raise UserError(
                f"{path}: the vector is zero at layer {layer}, so it has no direction there; "
                "use other layers"
            )


# (vector file, model name): warned about once already, or known to be a finetune (expect_model)
_settled = set()


def expect_model(path: Path, model_name: str) -> None:
    """Say that the vector file `path` is knowingly used with `model_name`, a finetune of the model
    it was extracted from (as `shift` does): check_model stays silent for that pair."""
    _settled.add((Path(path).resolve(), str(model_name)))


def check_model(meta: dict, path: Path, model) -> None:
    """Warn on stderr, once per file, when a vector records another model than `model` (a loaded
    model or a name).

    A warning, not an error: the method legitimately applies a base model's vector to its finetunes
    (`shift`, preventative steering). Same model: the same name, or the same folder (the one the
    name resolved to when the vector was made, `model_path`). Vectors that record no model
    (import-vector without --model) pass silently.
    """
    recorded, name = meta.get("model"), str(getattr(model, "name_or_path", model))
    key = (Path(path).resolve(), name)
    if not recorded or recorded == "unknown" or key in _settled:
        return

    def folders(*paths):
        return {
            Path(str(p)).expanduser().resolve()
            for p in paths
            if p and Path(str(p)).expanduser().is_dir()
        }

    here = {name.rstrip("/")} | folders(name, getattr(model, "source_dir", None))
    there = {str(recorded).rstrip("/")} | folders(recorded, meta.get("model_path"))
    if not here & there:
        _settled.add(key)
        print(
            f"warning: {path} was extracted from {recorded}, not {name}: "
            "fine for a finetune of that model, otherwise extract the vector from this one",
            file=sys.stderr,
        )


def sweep_path(vector: Path, meta: dict) -> Path:
    """Where `sweep` writes its result for a vector file's trait: TRAIT_sweep.json beside it."""
    trait = meta.get("trait") or Path(vector).name.split("_")[0]
    return Path(vector).parent / f"{trait}_sweep.json"


def sweep_layer(vector: Path, meta: dict) -> int:
    """The best layer that `sweep` found for this vector file's trait (--layer sweep), from a sweep
    of this very file (its bytes' sha256, where the sweep recorded it)."""
    path = sweep_path(vector, meta)
    if not path.is_file():
        trait = path.name[: -len("_sweep.json")]
        raise UserError(
            f"--layer sweep: no sweep result {path}: run `sweep {trait}` first (one "
            "run with --out DIR wrote it to DIR), or give --layer N"
        )
    result, again = read_json(path), "run the sweep again, or give --layer N"
    if not isinstance(result, dict):
        raise UserError(f"--layer sweep: {path} is not a sweep result: {again}")
    sha = result.get("vector_sha256")
    if sha is not None and sha != hashlib.sha256(Path(vector).read_bytes()).hexdigest():
        raise UserError(
            f"--layer sweep: {path} was swept on another {Path(vector).name} (its "
            f"sha256 differs; re-extracted?): {again}"
        )
    layer = result.get("best_layer")
    if layer is None:
        raise UserError(
            f"--layer sweep: the sweep in {path} chose no layer (no setting kept its "
            "coherence, or no judge): give --layer N"
        )
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise UserError(
            f"--layer sweep: {path}: best_layer {layer!r} is not a whole number: {again}"
        )
    return layer


def resolve_layer(
    layer: int | str | None, meta: dict, num_layers: int, path: Path | None = None
) -> int:
    """The layer to steer or monitor: `layer`; "sweep": the best layer of the trait's sweep (beside
    the vector file `path`, see sweep_layer); None: the layer the vector file records (import-gguf
    of one direction, or a sweep from when sweeps wrote into vectors), else the middle."""
    if layer == "sweep":
        if path is None:
            raise UserError("--layer sweep is not available here: give --layer N")
        layer = sweep_layer(path, meta)
    L = layer if layer is not None else meta.get("best_layer", num_layers // 2)
    if not isinstance(L, int) or not 1 <= L <= num_layers:
        raise UserError(f"--layer {L} out of range: this model has blocks 1..{num_layers}")
    if meta.get("last_row_post_norm") and L == num_layers:
        raise UserError(
            f"--layer {L}: this imported vector's last row was taken after the final norm, "
            f"unlike the residual stream steered here; use a layer below {num_layers}"
        )
    return L


# Conversation files: one {"messages": [...]} per line (what `monitor`, `flag` and `chat --save`
# read and write).

ROLES = ("system", "user", "assistant")


def assistant_turns(record) -> tuple[list[dict], list[int]] | str:
    """A JSONL record -> (messages, indices of the assistant turns that follow a user turn), or why
    it cannot be used (a short reason, counted by the caller)."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        return "no `messages` list"
    if not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        for m in messages
    ):
        return "a message without a known role or a text content"
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first_user]
    if turns:
        return messages, turns
    if first_user < len(messages) and any(m["role"] == "assistant" for m in messages):
        return "roles reversed? the assistant speaks before the first user turn and never after it"
    return "no assistant turn after a user turn"


def jsonl_conversations(src: Path, skipped: dict):
    """(line number, messages, indices of its assistant turns) for each usable line of a JSONL
    file; the others are counted in `skipped` by reason, with their line numbers. Streamed: one line
    in memory at a time."""
    with open(src, encoding="utf-8") as f:  # checked to be UTF-8 by check_text
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                parsed = assistant_turns(json.loads(line))
            except json.JSONDecodeError:
                parsed = "not JSON"
            if isinstance(parsed, str):
                skipped.setdefault(parsed, []).append(lineno)
            else:
                yield lineno, *parsed
