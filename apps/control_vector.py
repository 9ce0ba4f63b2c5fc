"""llama.cpp control vectors: persona vectors to and from its GGUF format
(`llama-server --control-vector FILE`); and `import-vector`, the official repository's .pt vector
files (torch.save) into this project's format.

A control-vector GGUF holds metadata general.architecture = "controlvector",
controlvector.model_hint (the model's architecture) and controlvector.layer_count (the number of
directions), and one 1-D F32 tensor "direction.N" per layer N. We write it with our own small GGUF
writer (`write_gguf`) and read it with support/gguf_convert.py.

The layer mapping, read from llama.cpp's source (the copy vendored in llama-cpp-python 0.3.36):
  - common/common.cpp, common_control_vector_load_one: a tensor "direction.N" must have N >= 1, be
    F32 and 1-D (otherwise llama.cpp logs an error and runs without the whole file); it is added
    into a buffer at offset (N - 1) * n_embd.
  - src/llama-adapter.cpp, llama_adapter_cvec::apply: offset (il - 1) * n_embd fills the tensor of
    block il, for il = 1 .. n_layer - 1 (block 0 never has one; anything past n_layer - 1 is
    ignored).
  - src/models/llama.cpp, qwen2.cpp and the other model graphs: the loop over blocks il = 0 ..
    n_layer - 1 ends with `cur = build_cvec(cur, il)`, which adds that tensor to the block's output
    (after the MLP's residual add).
llama.cpp counts blocks from 0 and we from 1 (our hidden index L is the output of block L; 0 is the
embeddings), so direction.N is added exactly where our hidden index N + 1 is:

    our v[L]  <->  llama.cpp direction.(L - 1),   L = 2 .. num_layers

Our L = 1 (the first block's output) would be direction.0, which llama.cpp refuses (it logs an error
and runs without the file), and L = 0 (the embeddings) has no counterpart at all. A script that
writes Hugging Face's hidden_states[L] (the same index as ours) as direction.L, as llama.cpp's own
cvector-generator does with the output of its block il (written as direction.(il + 1)), adds the
vector one block later than where it was measured. tests/test_llama_cpp.py checks this against a
real llama.cpp: v[L] written as direction.(L - 1) changes its next-token log-probabilities as our
steering at L does (measured r = 0.994-0.997); written one block off, r = 0.61-0.79.
"""

import datetime
import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from support import UserError, cli, records
from support.checkpoint import model_shape
from support.files import (
    NAME_RE,
    VARIANTS,
    atomic_write,
    check_fits,
    check_name,
    check_output,
    default_vectors_dir,
    load_vector,
    resolve_layer,
    save_vector,
    vector_path,
)

F32_MAX = float(np.finfo(np.float32).max)
ALIGNMENT = 32  # GGUF's default: the tensor data and each tensor start at a multiple of it
LAYER_CONVENTION = (
    "index 0 = embeddings, index L = output of block L (before the final norm); "
    "row L is llama.cpp's direction.(L - 1)"
)


def direction_name(L: int) -> str:
    """The llama.cpp tensor for our hidden index L (output of block L, 1-based).

    >>> direction_name(15)
    'direction.14'
    """
    return f"direction.{L - 1}"


def hidden_index(name: str) -> int | None:
    """Our hidden index for a llama.cpp tensor name, or None when it is not "direction.<integer>".

    >>> hidden_index("direction.14"), hidden_index("token_embd.weight")
    (15, None)
    """
    m = re.fullmatch(r"direction\.(\d+)", name)
    return int(m.group(1)) + 1 if m else None


# --------------------------------------------------------------------------------------------------
# A minimal GGUF writer: version 3, little-endian, metadata of strings / integers / floats / lists,
# tensors F32 or F16.

_GGML_TYPE = {np.dtype("<f4"): 0, np.dtype("<f2"): 1}  # F32, F16
_I32, _F32, _STRING, _ARRAY, _I64 = 5, 6, 8, 9, 11


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v) -> bytes:
    """A metadata value: its type (u32) and its bytes."""
    if isinstance(v, bool) or v is None:
        raise TypeError(f"unsupported GGUF metadata value {v!r}")
    if isinstance(v, str):
        return struct.pack("<I", _STRING) + _string(v)
    if isinstance(v, int):
        return struct.pack("<Ii", _I32, v) if -(2**31) <= v < 2**31 else struct.pack("<Iq", _I64, v)
    if isinstance(v, float):
        return struct.pack("<If", _F32, v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, type(v[0])) for x in v):
        items = [
            _value(x) for x in v
        ]  # each is its type (4 bytes) then its bytes; the array states the type once
        head = struct.pack("<IIQ", _ARRAY, struct.unpack("<I", items[0][:4])[0], len(v))
        return head + b"".join(i[4:] for i in items)
    raise TypeError(f"unsupported GGUF metadata value {v!r}")


def gguf_bytes(metadata: dict, tensors: dict[str, np.ndarray]) -> bytes:
    """A whole GGUF file: header, metadata, tensor infos, padding, then each tensor's data
    (aligned).

    Tensor infos list dimensions fastest-varying first (numpy's shape reversed) and offsets relative
    to the start of the data section.
    """
    arrays = {
        name: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        for name, a in tensors.items()
    }
    out = [b"GGUF", struct.pack("<IQQ", 3, len(arrays), len(metadata))]
    out += [_string(k) + _value(v) for k, v in metadata.items()]
    data, offset = [], 0
    for name, a in arrays.items():
        if a.dtype not in _GGML_TYPE:
            raise TypeError(f"tensor {name}: dtype {a.dtype} is not F32 or F16")
        out.append(
            _string(name)
            + struct.pack("<I", a.ndim)
            + struct.pack(f"<{a.ndim}Q", *reversed(a.shape))
            + struct.pack("<IQ", _GGML_TYPE[a.dtype], offset)
        )
        pad = -a.nbytes % ALIGNMENT
        data += [a.tobytes(), b"\0" * pad]
        offset += a.nbytes + pad
    head = b"".join(out)
    return head + b"\0" * (-len(head) % ALIGNMENT) + b"".join(data)


def write_gguf(path: Path, metadata: dict, tensors: dict[str, np.ndarray]) -> Path:
    blob = gguf_bytes(metadata, tensors)
    atomic_write(path, lambda p: Path(p).write_bytes(blob))
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Export: which rows of a persona vector go into the file.


def parse_layer_range(spec: str) -> tuple[int, int]:
    """'A-B' -> (A, B).

    >>> parse_layer_range("10-20")
    (10, 20)
    """
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise UserError(f"--layers {spec!r}: expected A-B with A <= B, e.g. --layers 10-20")
    return int(m.group(1)), int(m.group(2))


def select_directions(
    vec: torch.Tensor,
    layer: int | None = None,
    layers: tuple[int, int] | None = None,
    all_layers: bool = False,
    last_row_normed: bool = False,
) -> dict[int, torch.Tensor]:
    """{our hidden index L: the vector llama.cpp adds after block L} for vec
    [num_layers + 1, hidden].

    layer: that row alone. layers (A, B): every row A..B as it is; llama.cpp adds them all, so the
    pushes add up. all_layers: the increments v[l] - v[l-1] (our `--all-layers`), so that by block l
    the total added is v[l] - v[0]. llama.cpp cannot add after block 1, so block 1's increment is
    added after block 2 together with block 2's: direction.1 = v[2] - v[0]. From block 2 on, the
    total added is then exactly ours. last_row_normed: the last row was taken after the final norm
    (official .pt files): it is never exported.
    """
    N = vec.shape[0] - 1
    top = N - 1 if last_row_normed else N
    why_top = (
        " (the last row of an imported official vector was taken after the final norm)"
        if last_row_normed
        else ""
    )

    def check(L, flag):
        if L < 2 or L > top:
            first = (
                " llama.cpp adds control vectors only after our blocks 2.. "
                "(it refuses direction.0 and has none for the embeddings);"
                if L < 2
                else ""
            )
            raise UserError(
                f"{flag} {L} is outside the exportable layers 2..{top} of this "
                f"{N}-block model{why_top};{first} choose a layer in 2..{top}"
            )

    if sum(x is not None and x is not False for x in (layer, layers, all_layers)) != 1:
        raise UserError("give exactly one of --layer L, --layers A-B, --all-layers")
    if layer is not None:
        check(layer, "--layer")
        return {layer: vec[layer]}
    if layers is not None:
        check(layers[0], "--layers")
        check(layers[1], "--layers")
        return {L: vec[L] for L in range(layers[0], layers[1] + 1)}
    return {2: vec[2] - vec[0], **{L: vec[L] - vec[L - 1] for L in range(3, top + 1)}}


def _find_vector(vector: str, model: str | None) -> Path:
    """A vector file path, or a trait name looked up in vectors/<model name>/ as --steer does."""
    path = Path(vector)
    if path.is_file() or vector.endswith(".safetensors"):
        return path
    from support.hub import DEFAULT_MODEL

    found = vector_path(default_vectors_dir(model or DEFAULT_MODEL), vector)
    if not found.is_file():
        raise UserError(
            f"no vector file {vector!r} and no {found}: pass "
            f"a .safetensors file or run `extract {vector}`"
        )
    return found


def export_gguf(
    vector: str,
    out: str | None = None,
    layer: int | None = None,
    layers: str | None = None,
    all_layers: bool = False,
    coef: float = 1.0,
    model: str | None = None,
    force: bool = False,
) -> Path:
    """Write a persona vector as a llama.cpp control vector:
    `llama-server -m M.gguf --control-vector OUT`.

    vector: a vector file, or a trait name (vectors/<model
    name>/TRAIT_response_avg_diff.safetensors). layer (default: the file's best layer, else the
    middle one, as `generate` does), layers 'A-B' or all_layers: see `select_directions`. coef
    multiplies the vector into the file (1: leave scaling to llama.cpp's
    `--control-vector-scaled OUT SCALE`). model (default: the model recorded in the file) is
    checked against the vector's shape and gives controlvector.model_hint.
    """
    path = _find_vector(vector, model)
    vec, meta = load_vector(path)
    model = model or meta.get("model")
    if not model or model == "unknown":
        raise UserError(f"{path} does not record its model: name it with --model")
    num_layers, hidden, model_type = model_shape(model)
    check_fits(vec, meta, path, num_layers, hidden, model)
    if not np.isfinite(coef):
        raise UserError(f"--coef {coef}: must be a finite number")
    if layer is None and layers is None and not all_layers:
        layer = resolve_layer(None, meta, num_layers)
        own = "the layer the file records" if "best_layer" in meta else "the middle"
        print(f"layer {layer} ({own}; choose with --layer)", file=sys.stderr)
    last_row_normed = bool(meta.get("last_row_post_norm"))  # import-vector: official files
    rows = select_directions(
        vec, layer, parse_layer_range(layers) if layers else None, all_layers, last_row_normed
    )

    trait = meta.get("trait")
    if not (
        isinstance(trait, str) and NAME_RE.fullmatch(trait)
    ):  # it names the default --out: never a path
        trait = path.stem.removesuffix("_response_avg_diff")
    kind = (
        f"L{layer}"
        if layer is not None
        else f"L{layers.replace(' ', '')}"
        if layers
        else "all-layers"
    )
    out = check_output(out or path.with_name(f"{trait}_{kind}.gguf"), force, inputs=[path])
    tensors = {direction_name(L): (coef * v).numpy().astype("<f4") for L, v in sorted(rows.items())}
    if abs(coef) > F32_MAX or not all(
        np.isfinite(t).all() for t in tensors.values()
    ):  # control vectors are F32
        peak = max(float(v.abs().max()) for v in rows.values())
        raise UserError(
            f"--coef {coef:g} puts values beyond float32's range (about {F32_MAX:.3g}) into the "
            f"file: use a coefficient of at most {0.99 * F32_MAX / max(peak, 1.0):.3g} in size"
        )
    metadata = {
        "general.architecture": "controlvector",
        "controlvector.model_hint": model_type,
        "controlvector.layer_count": len(tensors),
        # ours, for a reader of the file (llama.cpp and repeng ignore them)
        "persona_vectors.model": str(model),
        "persona_vectors.trait": str(trait),
        "persona_vectors.coef": float(coef),
        "persona_vectors.hidden_layers": sorted(rows),
        "persona_vectors.selection": "increments" if all_layers else "rows",
    }
    write_gguf(out, metadata, tensors)
    what = (
        f"{coef:g} x v[{layer}] (output of block {layer} of {num_layers})"
        if layer is not None
        else f"{len(tensors)} direction(s) for blocks {min(rows)}..{max(rows)} of {num_layers}"
    )
    print(
        f"wrote {out}: {what} as "
        f"{', '.join(list(tensors)[:3])}{', ...' if len(tensors) > 3 else ''}\n"
        f"use: llama-server -m MODEL.gguf --control-vector-scaled {out}:1",
        file=sys.stderr,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Import: a llama.cpp / repeng control vector -> a vector file of ours.


def read_control_vector(
    path: Path, num_layers: int, hidden: int
) -> tuple[dict[int, np.ndarray], dict]:
    """{our hidden index L: direction [hidden] float32}, and the GGUF metadata; every problem a
    one-line UserError."""
    from support.gguf_convert import F32, GGUFFile, type_name

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no file {path}")
    try:
        g = GGUFFile(path)
    except ValueError as e:  # not GGUF, truncated, unknown version: the reader's message says which
        raise UserError(str(e)) from None
    arch = g.metadata.get("general.architecture")
    if arch != "controlvector":
        raise UserError(
            f"{path} is not a control vector (general.architecture = "
            f"{arch!r}, expected 'controlvector'): pass a file written "
            "by export-gguf, llama-cvector-generator or repeng"
        )
    if not g.tensors:
        raise UserError(f"{path} has no direction tensors: re-export it")
    rows = {}
    for name, info in g.tensors.items():
        L = hidden_index(name)
        if L is None:
            raise UserError(
                f"{path}: tensor {name!r} is not named "
                "direction.N: not a control vector, re-export it"
            )
        if L == 1:
            raise UserError(
                f"{path}: {name} makes llama.cpp refuse the whole file (its layers start at "
                "direction.1): re-export the file without it"
            )
        if info.ggml_type != F32:
            raise UserError(
                f"{path}: {name} is {type_name(info.ggml_type)}, but control vectors must be F32 "
                "(llama.cpp refuses others): re-export it as F32"
            )
        if len(info.shape) != 1:
            raise UserError(
                f"{path}: {name} has shape {list(info.shape)}, but "
                "a direction must be 1-D [hidden]: re-export it"
            )
        if info.shape[0] != hidden:
            raise UserError(
                f"{path}: {name} has {info.shape[0]} values but the model's hidden "
                f"size is {hidden}: pass the --model this control vector was made for"
            )
        if L > num_layers:
            raise UserError(
                f"{path}: {name} is past the last block of this {num_layers}-block model "
                f"(direction.1..direction.{num_layers - 1}): pass the --model it was made for"
            )
        rows[L] = g.dequantize(name).astype(np.float32)
        if not np.isfinite(rows[L]).all():
            raise UserError(f"{path}: {name} has non-finite values: re-export it")
    return rows, g.metadata


def import_gguf(
    file: str,
    model: str | None = None,
    name: str | None = None,
    out: str | None = None,
    cumulative: bool = False,
    force: bool = False,
) -> Path:
    """A control-vector GGUF -> vectors/<model name>/NAME_response_avg_diff.safetensors (or
    OUT/...).

    Row L of the vector is direction.(L - 1) (the reverse of `export_gguf`); rows without a
    direction are zero. A file with a single direction records that layer as best_layer, so
    `generate --steer NAME:COEF` steers there. cumulative: store running sums instead (row L =
    directions up to L), so that `generate --all-layers`, which adds v[l] - v[l-1] after block l,
    adds exactly what llama.cpp adds for the whole file.
    """
    from support.hub import DEFAULT_MODEL

    path, model = Path(file), model or DEFAULT_MODEL
    name = (
        check_name(name) if name is not None else re.sub(r"^[^\w]+|[^\w.-]+", "_", path.stem)[:100]
    )
    dest = check_output(
        vector_path(Path(out) if out else default_vectors_dir(model), name),
        force,
        inputs=[path],
        option="--name or --out",
    )
    num_layers, hidden, _ = model_shape(model)
    rows, gguf_meta = read_control_vector(path, num_layers, hidden)
    vec = torch.zeros(num_layers + 1, hidden)
    for L, d in rows.items():
        vec[L] = torch.from_numpy(d)
    if cumulative:
        vec = vec.cumsum(0)
    layers = sorted(rows)
    meta = dict(
        trait=name,
        variant="llama.cpp control vector",
        model=model,
        imported_from=str(path),
        model_hint=gguf_meta.get("controlvector.model_hint", "unknown"),
        layer_convention=LAYER_CONVENTION,
        control_vector_layers=layers,
        cumulative=cumulative,
        vector_norm=[round(x, 4) for x in vec.norm(dim=-1).tolist()],
    )
    if len(layers) == 1:
        meta["best_layer"] = layers[0]
    save_vector(dest, vec, meta)
    print(
        f"wrote {dest}: {len(layers)} direction(s) at layer(s) {layers[0]}..{layers[-1]}"
        + (
            ""
            if len(layers) == 1
            else "; llama.cpp adds them all at once, `generate --layer L` steers one of them"
            + (
                ""
                if cumulative
                else " (import with --cumulative for `generate --all-layers` to add them all)"
            )
        ),
        file=sys.stderr,
    )
    return dest


def import_vector(
    file: str, out: str | None = None, model: str | None = None, force: bool = False
) -> Path:
    """Convert an official-repository vector file (`torch.save` of an [L + 1, hidden] tensor) to
    this format.

    Written to `out`, else to vectors/<model>/ when the model is named (where `--steer TRAIT:COEF`
    looks), else beside the file. The file is read with `torch.load(weights_only=True)`, which
    refuses anything but tensors. The tensor must be finite and, when the model is named, fit it
    ([num_layers + 1, hidden], see check_fits). The official files' last row is taken after the
    final norm (Hugging Face's last hidden state), unlike ours: it is recorded, and steering or
    monitoring never uses that row.
    """
    src = Path(file)
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    dest_dir = Path(out) if out else default_vectors_dir(model) if model else src.parent
    dest = check_output(dest_dir / f"{src.stem}.safetensors", force, inputs=[src])
    shape = model_shape(model) if model else None
    with open(src, "rb") as f:
        head = f.read(2)
    if head not in (
        b"PK",
        b"\x80\x02",
    ):  # torch.save writes a zip archive (older versions a pickle, protocol 2)
        raise UserError(
            f"{src} is not a torch file (torch.save writes a zip archive, this "
            f"starts with {head!r}); expected an official <trait>_<variant>_diff.pt"
        )
    try:
        vec = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{src} holds more than tensors (pickled objects), which this project never loads"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(
            f"cannot read {src} as a tensor file ({str(e).splitlines()[0]}); expected an official "
            "<trait>_<variant>_diff.pt"
        ) from None
    if not isinstance(vec, torch.Tensor) or vec.dim() != 2 or not vec.is_floating_point():
        raise UserError(
            f"{src} holds {type(vec).__name__} {tuple(getattr(vec, 'shape', ()))}, expected one "
            "[num_layers + 1, hidden] tensor of floats"
        )
    if not torch.isfinite(vec).all():
        raise UserError(f"{src} has non-finite values (NaN or infinity): it is no usable vector")
    if shape and tuple(vec.shape) != (shape[0] + 1, shape[1]):
        raise UserError(
            f"{src} is [{vec.shape[0]}, {vec.shape[1]}], but {model} "
            f"needs [{shape[0] + 1}, {shape[1]}] ({shape[0]} blocks + the "
            "embeddings): pass the --model it was extracted from"
        )
    stem = src.stem  # e.g. evil_response_avg_diff
    variant = next((v for v in VARIANTS if stem.endswith(f"_{v}_diff")), "unknown")
    trait = stem[: -len(f"_{variant}_diff")] if variant != "unknown" else stem
    meta = dict(
        trait=trait,
        variant=variant,
        model=model or "unknown",
        imported_from=str(src),
        layer_convention=records.LAYER_CONVENTION,
        last_row_post_norm=True,
        vector_norm=[round(x, 4) for x in vec.float().norm(dim=-1).tolist()],
        date=datetime.date.today().isoformat(),
    )
    return save_vector(dest, vec, meta)


# --------------------------------------------------------------------------------------------------
# Command line: python -m apps (apps/__main__.py) calls add_commands(sub).


def add_commands(sub) -> None:
    e = sub.add_parser(
        "export-gguf", help="write a persona vector as a llama.cpp control vector (GGUF)"
    )
    e.add_argument(
        "vector", help="a vector .safetensors file, or a trait name in vectors/<model name>/"
    )
    e.add_argument(
        "--out",
        type=cli.OUTPUT_FILE,
        default=None,
        help="output .gguf (default: TRAIT_L<layer>.gguf beside the vector)",
    )
    which = e.add_mutually_exclusive_group()
    which.add_argument(
        "--layer",
        type=cli.bounded("hidden_index"),
        default=None,
        help="our layer L (output of block L, 2..N) (default: the best layer, else the middle)",
    )
    which.add_argument(
        "--layers", default=None, metavar="A-B", help="every layer A..B, each with its own row"
    )
    which.add_argument(
        "--all-layers", action="store_true", help="the increments v[l] - v[l-1] at every block"
    )
    e.add_argument(
        "--coef",
        type=cli.COEF,
        default=1.0,
        help="multiply into the file (default 1: scale in llama.cpp)",
    )
    e.add_argument("--model", default=None, help="default: the model recorded in the vector")
    e.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    e.set_defaults(
        run=lambda a: export_gguf(
            a.vector,
            out=a.out,
            layer=a.layer,
            layers=a.layers,
            all_layers=a.all_layers,
            coef=a.coef,
            model=a.model,
            force=a.force,
        )
    )

    i = sub.add_parser(
        "import-gguf", help="read a llama.cpp / repeng control vector (GGUF) into a vector file"
    )
    i.add_argument("file", type=cli.INPUT_FILE, help="a control-vector .gguf")
    i.add_argument("--model", default=None, help="the model it is for (default: the default model)")
    i.add_argument(
        "--name", default=None, help="trait name for --steer NAME (default: the file's name)"
    )
    i.add_argument(
        "--out",
        type=cli.OUTPUT_DIR,
        default=None,
        help="output directory (default: vectors/<model name>/)",
    )
    i.add_argument(
        "--cumulative", action="store_true", help="running sums, for generate --all-layers"
    )
    i.add_argument("--force", action="store_true", help="overwrite an existing vector of that name")
    i.set_defaults(
        run=lambda a: import_gguf(
            a.file,
            model=a.model,
            name=a.name,
            out=a.out,
            cumulative=a.cumulative,
            force=a.force,
        )
    )

    iv = sub.add_parser(
        "import-vector", help="convert an official-repository .pt vector file to .safetensors"
    )
    iv.add_argument("file", type=cli.INPUT_FILE)
    iv.add_argument(
        "--model",
        default=None,
        help=(
            "the model it was extracted from: recorded, "
            "and the default destination vectors/<model>/"
        ),
    )
    iv.add_argument(
        "--out",
        type=cli.OUTPUT_DIR,
        default=None,
        help="output directory (default: vectors/<model name>/ with --model, else beside the file)",
    )
    iv.add_argument("--force", action="store_true", help="replace an existing vector file")
    iv.set_defaults(run=lambda a: import_vector(a.file, out=a.out, model=a.model, force=a.force))
