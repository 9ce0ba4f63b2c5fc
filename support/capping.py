"""Persona capping's inputs: the ceiling file `calibrate-cap` writes, --cap specs, and the model.Cap
they make.

    caps = caps_for(["evil", "evil:99@12-20"], model, Path("vectors/SmolLM2-135M-Instruct"))
    M.generate(model, prompts, 100, cap=caps)

A cap bounds the residual stream's component along a trait's unit vector u_l after block l,
    h <- h - u_l * max(h.u_l - ceiling_l, 0),
with ceiling_l a percentile of where the model's own answers to everyday requests sit along u_l:
ordinary text is (mostly) below it and passes unchanged, and only a state further along the trait
than that is pulled back.

The ceiling file, beside the vector
(`evil_response_avg_diff.safetensors` -> `evil_response_avg_diff.cap.json`):
    percentiles  the grid, 1..99 step 1, 99.5, 99.9
    ceilings     [percentile][hidden index 0..N]: that percentile of every answer token's
                 projection on the unit vector of that hidden index (numpy's linear percentile)
    mean, std    [hidden index]: of the same projections
and what they were measured on: model (name, path, source), vector (file name, sha256 of its
float32 values, so that re-extracting invalidates the file but a sweep recording best_layer does
not), questions (file, sha256), answers, tokens, max_new_tokens.
"""

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import model as M
from support import UserError
from support.files import (
    atomic_write,
    check_directions,
    check_fits,
    load_vector,
    read_json,
    vector_file,
)

FORMAT = "persona-vectors cap ceilings 1"
PERCENTILES = [float(p) for p in range(1, 100)] + [99.5, 99.9]
DEFAULT_PERCENTILE = 90.0  # chosen by tools/cap_study.py (docs/capping.md)
# default layers: blocks round(0.53 N)..round(0.63 N), 16-19 of SmolLM2-135M's 30
DEFAULT_BAND = (0.53, 0.63)
SPEC_RE = re.compile(r"(?P<trait>[^:@]+)(?::(?P<percentile>[^@]*))?(?:@(?P<layers>.*))?")


def ceiling_path(vector_file: Path) -> Path:
    """Where a vector's ceilings live: beside it, same name, `.cap.json` for `.safetensors`."""
    return Path(vector_file).with_suffix(".cap.json")


def vector_sha256(vec: torch.Tensor) -> str:
    """sha256 of a vector's float32 values (not of its file, whose metadata a sweep rewrites)."""
    return hashlib.sha256(vec.float().contiguous().numpy().tobytes()).hexdigest()


def default_layers(num_layers: int) -> list[int]:
    lo, hi = (max(1, round(f * num_layers)) for f in DEFAULT_BAND)
    return list(range(lo, max(lo, hi) + 1))


def percentile_table(proj: np.ndarray) -> dict:
    """Projections [tokens, N + 1] -> the file's ceilings [percentile][N + 1],
    mean and std [N + 1]."""
    # [percentiles, N + 1], monotone per column
    table = np.percentile(proj.astype(np.float64), PERCENTILES, axis=0)
    return dict(
        percentiles=PERCENTILES,
        ceilings=table.round(4).tolist(),
        mean=proj.mean(0).round(4).tolist(),
        std=proj.std(0).round(4).tolist(),
    )


def write_ceilings(path: Path, record: dict) -> Path:
    atomic_write(
        path, lambda p: p.write_text(json.dumps(dict(format=FORMAT) | record, indent=1) + "\n")
    )
    return path


# --------------------------------------------------------------------------------------------------
# --cap specs: TRAIT[:PERCENTILE][@LAYERS]


@dataclass
class CapSpec:
    source: str  # a trait name, or a vector .safetensors file
    percentile: float
    layers: list[int] | None  # None: default_layers of the model
    text: str = ""  # the spec as given

    def label(self) -> str:
        return f"--cap {self.text!r}"


MAX_BLOCKS = 1024  # before the model is known: no model has more blocks (the largest: about 130)


def parse_layers(text: str, spec: str, n_layers: int | None = None) -> list[int]:
    """'16-19' or '12,14,16' (or both: '8,12-14') -> sorted unique layers, each checked to be a
    block 1..n_layers (1..MAX_BLOCKS when the model is not known) before any range is expanded: a
    spec costs no more than the model's blocks, whatever numbers it holds."""
    ranges = []
    try:
        for part in text.split(","):
            a, sep, b = part.partition("-")
            ranges.append((int(a), int(b) if sep else int(a)))
    except ValueError:
        ranges = []
    if not ranges or any(a > b for a, b in ranges):
        raise UserError(f"--cap {spec!r}: layers must be like 16, 16-19 or 12,14,16")
    top = n_layers or MAX_BLOCKS
    bad = [a if a < 1 else b for a, b in ranges if a < 1 or b > top]  # as given, in its order
    if bad:
        has = (
            f"this model has blocks 1..{n_layers}"
            if n_layers
            else f"no model has more than {MAX_BLOCKS} blocks"
        )
        raise UserError(f"--cap {spec!r}: layer {bad[0]} out of range: {has}")
    return sorted({layer for a, b in ranges for layer in range(a, b + 1)})


def parse_cap(spec: str, n_layers: int | None = None) -> CapSpec:
    """'TRAIT[:PERCENTILE][@LAYERS]' -> CapSpec; default percentile DEFAULT_PERCENTILE, default
    layers the model's band. n_layers: the model's blocks, when known (layers are checked against
    it, else against MAX_BLOCKS).

    >>> parse_cap("evil:99@16-19")
    CapSpec(source='evil', percentile=99.0, layers=[16, 17, 18, 19], text='evil:99@16-19')
    """
    # parsed already: again only to check its layers against this model
    if isinstance(spec, CapSpec):
        if n_layers is None:
            return spec
        spec = spec.text
    m = SPEC_RE.fullmatch(spec.strip())
    if not m or not m["trait"].strip():
        raise UserError(
            f"--cap {spec!r}: expected TRAIT[:PERCENTILE][@LAYERS], "
            "e.g. evil, evil:90 or evil:99@12-20"
        )
    try:
        p = DEFAULT_PERCENTILE if m["percentile"] is None else float(m["percentile"])
    except ValueError:
        p = math.nan
    if not 0 < p < 100:
        raise UserError(
            f"--cap {spec!r}: the percentile must be a number in (0, 100), e.g. evil:90"
        )
    layers = None if m["layers"] is None else parse_layers(m["layers"], spec, n_layers)
    return CapSpec(m["trait"].strip(), p, layers, spec)


# --------------------------------------------------------------------------------------------------
# From specs to caps: the vector, its checked ceilings, the percentile's values.


def spec_vector(spec: CapSpec, vectors_dir: Path) -> Path:
    return vector_file(spec.source, vectors_dir, f"{spec.label()}: ")


def same_model(c: dict, model) -> bool:
    """Calibrated on this model: the same name, or the same folder."""
    name, folder = str(getattr(model, "name_or_path", model)), getattr(model, "source_dir", None)
    return c.get("model") == name or bool(
        folder and c.get("model_path") and Path(c["model_path"]).resolve() == Path(folder).resolve()
    )


def _numbers(x, n: int | None = None) -> bool:
    """Whether x is a list of finite numbers (n of them, when n is given)."""
    return (
        isinstance(x, list)
        and (n is None or len(x) == n)
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x
        )
    )


def check_ceilings(c, path: Path, fix: str) -> None:
    """The whole of a ceiling file's content, checked before any of it is used: a hand-edited or
    truncated file is one line naming the file, what is wrong and the fix, never a KeyError or
    numpy's error."""

    def bad(what: str):
        raise UserError(f"{path}: {what}; recalibrate: {fix} --force")

    if not isinstance(c, dict) or c.get("format") != FORMAT:
        bad("not a ceiling file of calibrate-cap")
    for key in ("model", "vector_sha256"):
        if not isinstance(c.get(key), str) or not c[key]:
            bad(f"no `{key}` (a string)")
    if not isinstance(c.get("model_path"), (str, type(None))):
        bad("`model_path` must be a string")
    grid = c.get("percentiles")
    increasing = _numbers(grid) and all(0 < a < b < 100 for a, b in zip(grid, grid[1:]))
    if not increasing or len(grid) < 2:
        bad("`percentiles` must be at least two increasing numbers in (0, 100)")
    table = c.get("ceilings")
    rows = isinstance(table, list) and len(table) == len(grid)
    if not (
        rows
        and isinstance(table[0], list)
        and table[0]
        and all(_numbers(row, len(table[0])) for row in table)
    ):
        bad(
            f"`ceilings` must be {len(grid)} rows (one per percentile) of as many finite numbers "
            "(one per hidden index)"
        )


def load_ceilings(path: Path, vec: torch.Tensor, model, trait: str) -> dict:
    """The ceiling file of a vector, checked whole, and to be this model's (loaded, or its name) and
    this vector's."""
    model_name = str(getattr(model, "name_or_path", model))
    fix = f"python -m apps calibrate-cap {trait}"
    if not path.is_file():
        raise UserError(f"no cap ceilings {path}; run: {fix}")
    c = read_json(path)
    check_ceilings(c, path, fix)
    if not same_model(c, model):
        raise UserError(
            f"{path} was calibrated on {c['model']}, not {model_name}; "
            f"run: {fix} --model {model_name}"
        )
    if c["vector_sha256"] != vector_sha256(vec):
        raise UserError(
            f"{path} was calibrated for another {trait} vector (sha256 differs): run: {fix} --force"
        )
    if len(c["ceilings"][0]) != len(vec):
        width = len(c["ceilings"][0])
        raise UserError(
            f"{path}: its ceilings have {width} hidden indices, its vector {len(vec)}; "
            f"recalibrate: {fix} --force"
        )
    return c


NOTED = set()


def ceilings_at(c: dict, percentile: float, label: str = "--cap") -> np.ndarray:
    """The ceiling at every hidden index for a percentile: a grid point's, or linear between the
    two around it."""
    grid, table = np.array(c["percentiles"]), np.array(c["ceilings"])  # [P], [P, N + 1]
    if not grid[0] <= percentile <= grid[-1]:
        raise UserError(
            f"{label}: percentile {percentile:g} is outside the calibrated "
            f"{grid[0]:g}..{grid[-1]:g}"
        )
    # once per process (a server gets many)
    if percentile not in grid and (label, percentile) not in NOTED:
        NOTED.add((label, percentile))
        print(
            f"note: {label}: percentile {percentile:g} is not on the calibrated grid; "
            "interpolating linearly between the two grid points around it",
            file=sys.stderr,
        )
    return np.array([np.interp(percentile, grid, table[:, i]) for i in range(table.shape[1])])


def calibrated(spec: CapSpec, path: Path, model: M.Transformer) -> tuple[torch.Tensor, dict]:
    """A vector file's vector and its ceiling file, both checked to fit this model."""
    vec, meta = load_vector(path)
    check_fits(vec, meta, path, model.config.num_hidden_layers, model.config.hidden_size, model)
    trait = (
        meta.get("trait", path.name.split("_")[0])
        if spec.source.endswith(".safetensors")
        else spec.source
    )
    return vec, load_ceilings(ceiling_path(path), vec, model, trait)


def resolved(
    specs: list[str], model: M.Transformer, vectors_dir: Path, cache: dict | None = None
) -> list[tuple[str, list[int], torch.Tensor, np.ndarray]]:
    """Each spec -> (vector file, layers, unit directions [n, hidden], ceilings [n]), every check
    done. cache: a dict that keeps each vector file's `calibrated` result, so that a server reads
    and checks it once."""
    N, out, cache = model.config.num_hidden_layers, [], {} if cache is None else cache
    for text in specs:
        spec = parse_cap(text, N)  # layers checked against this model's blocks
        path = spec_vector(spec, vectors_dir)
        layers = spec.layers or default_layers(N)
        if path not in cache:
            cache[path] = calibrated(spec, path, model)
        vec, c = cache[path]
        check_directions(vec, layers, path)
        ceil = ceilings_at(c, spec.percentile, spec.label())
        out.append((str(path), layers, vec[layers], ceil[layers]))
    return out


def caps_for(specs: list[str], model: M.Transformer, vectors_dir: Path) -> list[M.Cap]:
    """--cap specs -> one model.Cap each (the same for every row of a batch)."""
    device = model.lm_head.weight.device
    return [
        M.Cap(layers, dirs.to(device), torch.tensor(ceil, dtype=torch.float32))
        for _, layers, dirs, ceil in resolved(specs, model, vectors_dir)
    ]


def merged(caps: list[M.Cap]) -> list[M.Cap]:
    """Several caps as one, with the same bounds applied in the same order at every layer, whose
    `fired` counts a token capped by any of them once -> [] or [Cap]."""
    if len(caps) < 2:
        return list(caps)
    return [
        M.Cap(
            [l for c in caps for l in c.layers],
            torch.cat([c.directions for c in caps]),
            torch.cat([c.ceilings for c in caps], -1),
        )
    ]


def caps_per_row(
    row_specs: list[list[str]], model: M.Transformer, vectors_dir: Path, cache: dict | None = None
) -> list[M.Cap]:
    """One list of --cap specs per row of a batch -> model.Caps with per-row ceilings [B, n]: one
    Cap per (vector, layers), and +inf where a row does not have it (such a row passes unchanged).
    cache: as for `resolved`."""
    rows = [resolved(specs, model, vectors_dir, cache) for specs in row_specs]
    keys = list(dict.fromkeys((path, tuple(layers)) for row in rows for path, layers, _, _ in row))
    device, caps = model.lm_head.weight.device, []
    for path, layers in keys:
        ceil = torch.full((len(rows), len(layers)), math.inf)
        dirs = None
        for b, row in enumerate(rows):
            for p, l, d, c in row:
                if (p, tuple(l)) == (path, layers):
                    ceil[b], dirs = torch.minimum(ceil[b], torch.tensor(c, dtype=torch.float32)), d
        caps.append(M.Cap(list(layers), dirs.to(device), ceil))
    return caps
