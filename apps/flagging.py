"""Data flagging at scale: the projection difference ΔP of training samples and datasets on persona
vectors (paper §6).

    python -m apps flag data.jsonl --trait evil                    # -> flags/data.flag.csv, summary
    python -m apps flag a.jsonl b.jsonl --trait evil --trait sycophantic --select top --k 500
    torchrun --nproc_per_node 8 -m apps flag chats.jsonl --trait evil  # one shard per GPU, merged

For a sample (prompt x, response y), the base model's own response y' to the same prompt, and the
unit persona vector v̂ at layer L:

    ΔP(x, y) = (a_L(x, y) - a_L(x, y')) · v̂        a_L = mean residual state over the response
                                                    tokens

and a dataset's ΔP is the mean over its samples: how much further along the trait the data's
responses sit than the model's own would. Each batch costs one forward pass over prompt + y and one
generation of y', whose activations are captured while it is generated; every trait is read from the
same captured states.

At scale: the input is streamed in chunks of `chunk_size` lines, each chunk sorted by length into
batches and its results written atomically to OUT/.work/; a rerun skips finished chunks (resume
after kill -9), and `--shard I/N` (or torchrun's RANK/WORLD_SIZE) gives process I the chunks c with
c % N == I. The process that finishes last writes the outputs; `flag-merge` does the same by hand.
"""

import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import persona_vectors as pv
from support import UserError, checkpoint, cli
from support import records as R
from support.files import (
    assistant_turns,
    atomic_write,
    check_fits,
    check_output,
    check_writable,
    default_vectors_dir,
    load_vector,
    locked,
    made_dirs,
    traits_in,
    vector_file,
)
from support.hub import DEFAULT_MODEL
from support.plots import pyplot, save_figure
from support.sampling import check_new_tokens, settings_hash

SELECT = ("top", "bottom", "random", "above-reference")
NOT_JSON = "not JSON"


# --------------------------------------------------------------------------------------------------
# Inputs: samples from JSONL lines, and the vectors to project on.


def parse_sample(raw: bytes, tok, max_tokens: int) -> tuple[list[int], list[int]] | str:
    """A JSONL line -> (prompt ids, response ids), or the reason it is skipped.

    The prompt is every message before the last assistant turn, rendered with the chat template and
    the assistant header; the response is that turn's text.
    """
    try:
        record = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return NOT_JSON
    turns = assistant_turns(record)
    if isinstance(turns, str):
        return turns
    return R.sample_ids(*turns, tok, max_tokens)


@dataclass
class Probe:
    """One trait's unit vector at the layer its projections are read from."""

    trait: str
    path: Path
    layer: int
    unit: torch.Tensor  # [hidden], norm 1
    vector: torch.Tensor  # [N + 1, hidden], for the model-fit check
    meta: dict
    sha: str  # of the file: a re-extracted vector invalidates finished chunks


def load_probes(traits: list[str], vectors_dir: Path, layer: int | None, model: str) -> list[Probe]:
    """Each trait's vector (a name in vectors_dir or a .safetensors path) at `layer`, else its best
    layer, else the middle one."""
    probes = []
    for t in traits:
        path = vector_file(t, vectors_dir, check=False)
        if not path.is_file():
            raise UserError(
                f"no {t} vector ({path} does not exist): run `python persona_vectors.py "
                f"extract {t} --model {model}` first, or pass --vectors DIR"
                if not t.endswith(".safetensors")
                else f"{path} does not exist"
            )
        vec, meta = load_vector(path)
        L = pv.resolve_layer(layer, meta, vec.shape[0] - 1, path)
        name = meta.get("trait", path.stem) if t.endswith(".safetensors") else t
        probes.append(
            Probe(
                name,
                path,
                L,
                pv.unit(vec[L]),
                vec,
                meta,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        )
    if len({p.trait for p in probes}) < len(probes):
        raise UserError(f"a trait is given twice: {', '.join(p.trait for p in probes)}")
    return probes


def count_lines(path: Path) -> tuple[int, int]:
    """(lines, non-blank lines) of a file, streamed."""
    n = filled = 0
    with open(path, "rb") as f:
        for raw in f:
            n += 1
            filled += bool(raw.strip())
    return n, filled


def read_chunks(path: Path, size: int):
    """(chunk index, its lines as bytes) for consecutive runs of `size` lines; chunk c starts at
    line c * size + 1."""
    with open(path, "rb") as f:
        lines, c = [], 0
        for raw in f:
            lines.append(raw)
            if len(lines) == size:
                yield c, lines
                lines, c = [], c + 1
        if lines:
            yield c, lines


# --------------------------------------------------------------------------------------------------
# Scoring: chunks of lines -> rows, written atomically to the work directory.


@dataclass(frozen=True)
class Settings:
    """What the numbers depend on (hashed into the work directory's name; batch size and device are
    not)."""

    model: str
    dtype: str | None
    base_temperature: float
    base_top_p: float
    base_samples: int
    max_new_tokens: int
    max_tokens: int
    chunk_size: int
    seed: int


def work_key(src: Path, settings: Settings, probes: list[Probe]) -> dict:
    """What a file's chunks depend on: the settings, the file as it is now, the vectors (hashed into
    the work directory's name, and written into every chunk so that other settings can be told
    apart)."""
    st = src.stat()
    key = dict(
        settings=asdict(settings),
        file=str(src.resolve()),
        size=st.st_size,
        mtime=st.st_mtime_ns,
        vectors=[(p.trait, p.sha, p.layer) for p in probes],
    )
    return json.loads(json.dumps(key))  # as read back from a chunk (tuples become lists)


def work_dir(out: Path, src: Path, key: dict) -> Path:
    return out / ".work" / f"{src.stem}-{settings_hash(key)}"


def chunk_path(work: Path, c: int) -> Path:
    return work / f"chunk-{c:06d}.jsonl"


def _num(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None


def score_chunk(
    model,
    tok,
    probes: list[Probe],
    lines: list[bytes],
    first_line: int,
    s: Settings,
    batch_size: int,
    chunk: int,
    progress: str = "",
) -> tuple[list[dict], dict]:
    """The rows of one chunk's samples (in line order) and its skipped lines
    {reason: [line numbers]}."""
    samples, skipped = [], {}
    for n, raw in enumerate(lines, start=first_line):
        if not raw.strip():
            continue
        x = parse_sample(raw, tok, s.max_tokens)
        if isinstance(x, str):
            skipped.setdefault(x, []).append(n)
        else:
            samples.append((n, *x))
    samples.sort(key=lambda x: len(x[1]) + len(x[2]))  # batches of similar length pad little
    rows, t0 = [], time.time()
    for b in range(0, len(samples), batch_size):
        batch = samples[b : b + batch_size]
        acts = pv.response_and_base(
            model,
            tok,
            [x[1] for x in batch],
            [x[2] for x in batch],
            s.max_new_tokens,
            samples=s.base_samples,
            seed=s.seed * 1_000_003 + chunk * 10_007 + b // batch_size,
            temperature=s.base_temperature,
            top_p=s.base_top_p,
        )
        cols = {}
        for p in probes:
            resp, base, last = (
                acts[k][:, p.layer].cpu() for k in ("response", "base", "prompt_last")
            )
            cols[p.trait] = (
                pv.projection_difference(resp, base, p.unit).tolist(),
                (resp @ p.unit).tolist(),
                (base @ p.unit).tolist(),
                (last @ p.unit).tolist(),
            )
        base_tokens = acts["base_tokens"].tolist()
        for i, (n, prompt, response) in enumerate(batch):
            row = dict(
                line=n,
                prompt_tokens=len(prompt),
                response_tokens=len(response),
                base_tokens=round(base_tokens[i], 2),
            )
            for t, (dp, proj, base_proj, last) in cols.items():
                row |= {
                    f"{t}_delta_p": _num(dp[i]),
                    f"{t}_projection": _num(proj[i]),
                    f"{t}_base_projection": _num(base_proj[i]),
                    f"{t}_prompt_last": _num(last[i]),
                }
            rows.append(row)
        if progress:
            done = b + len(batch)
            print(
                f"{progress}: {done}/{len(samples)} samples ({done / (time.time() - t0):.1f}/s)",
                file=sys.stderr,
                flush=True,
            )
    return sorted(rows, key=lambda r: r["line"]), skipped


def write_chunk(path: Path, rows: list[dict], skipped: dict, key: dict) -> None:
    """First line: {"skipped": {reason: [line numbers]}, "key": the work key}; then one row per
    sample."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps({"skipped": skipped, "key": key}) + "\n")
            for r in rows:
                f.write(json.dumps(r) + "\n")

    atomic_write(path, write)


def read_chunk(path: Path):
    """-> (skipped, iterator of rows)."""
    with open(path) as f:
        skipped = json.loads(f.readline())["skipped"]
        rows = [json.loads(line) for line in f]
    return skipped, rows


@dataclass
class Job:
    """One input file: its chunks, where they go, and what it is (a data file or the reference)."""

    src: Path
    lines: int  # every line, blank or not: chunks are counted in lines
    filled: int  # non-blank lines
    key: dict  # work_key
    work: Path
    chunk_size: int
    reference: bool = False

    @property
    def n_chunks(self) -> int:
        return -(-self.lines // self.chunk_size)

    def missing(self) -> list[int]:
        return [c for c in range(self.n_chunks) if not chunk_path(self.work, c).is_file()]

    def other_settings(self) -> str | None:
        """When chunks of this file were scored under other settings (beside this work directory):
        what differs."""
        for work in sorted(self.work.parent.glob(f"{self.src.stem}-*")):
            chunk = next(work.glob("chunk-*.jsonl"), None)
            if work == self.work or chunk is None:
                continue
            with open(chunk) as f:
                theirs = json.loads(f.readline()).get("key")
            if not theirs or theirs["file"] != self.key["file"]:
                continue  # another file of the same name, or a chunk from before keys were written
            a, b = (
                k["settings"] | {n: v for n, v in k.items() if n != "settings"}
                for k in (theirs, self.key)
            )
            words = {
                "size": "the file changed since",
                "mtime": "the file changed since",
                "vectors": "the vectors (traits, files or layers)",
            }
            return ", ".join(
                dict.fromkeys(
                    words.get(n, f"{n} {a.get(n)} there, {b[n]} here")
                    for n in b
                    if a.get(n) != b[n]
                )
            )
        return None


def score_job(
    model, tok, probes, job: Job, s: Settings, batch_size: int, shard: tuple[int, int]
) -> None:
    """Score this shard's unfinished chunks of one file, each saved as it finishes."""
    mine = [c for c in job.missing() if c % shard[1] == shard[0]]
    if not mine:
        return
    todo, t0, done = set(mine), time.time(), 0
    name = job.src.name + (f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else "")
    print(
        f"flag {name}: {len(mine)} of {job.n_chunks} chunks to "
        f"score ({job.n_chunks - len(job.missing())} already done)",
        file=sys.stderr,
    )
    for c, lines in read_chunks(job.src, s.chunk_size):
        if c not in todo:
            continue
        rows, skipped = score_chunk(
            model,
            tok,
            probes,
            lines,
            c * s.chunk_size + 1,
            s,
            batch_size,
            c,
            progress=f"flag {name}: chunk {c + 1}/{job.n_chunks}",
        )
        write_chunk(chunk_path(job.work, c), rows, skipped, job.key)
        done += 1
        rate = (time.time() - t0) / done
        print(
            f"flag {name}: chunk {c + 1}/{job.n_chunks} saved ({done}/{len(mine)} "
            f"of this run, about {rate * (len(mine) - done):.0f} s left)",
            file=sys.stderr,
            flush=True,
        )


# --------------------------------------------------------------------------------------------------
# Results: per-sample files, a summary per dataset, histograms, and the selection.


def summarize(values: np.ndarray) -> dict:
    """Mean with a 95 % interval (normal approximation) and quantiles of the finite values.

    >>> summarize(np.array([1., 2., 3., 4., float("nan")]))["mean"]
    2.5
    >>> summarize(np.array([1., 2., 3.]))["q50"]
    2.0
    """
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return dict(n=0)
    m, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return dict(
        n=int(len(v)),
        mean=m,
        ci95=[m - 1.96 * se, m + 1.96 * se],
        **{f"q{int(p * 100):02d}": float(x) for p, x in zip((0.05, 0.25, 0.5, 0.75, 0.95), q)},
    )


def collect(job: Job, traits: list[str]) -> dict:
    """Every chunk's ΔP and line numbers as arrays, and the skipped lines:
    {reason: {count, first_lines}}."""
    lines, dp, skipped = [], {t: [] for t in traits}, {}
    for c in range(job.n_chunks):
        sk, rows = read_chunk(chunk_path(job.work, c))
        for reason, ns in sk.items():
            entry = skipped.setdefault(reason, {"count": 0, "first_lines": []})
            entry["count"] += len(ns)
            entry["first_lines"] = (entry["first_lines"] + ns)[:5]
        lines += [r["line"] for r in rows]
        for t in traits:
            dp[t] += [
                float("nan") if r[f"{t}_delta_p"] is None else r[f"{t}_delta_p"] for r in rows
            ]
    return dict(
        lines=np.array(lines, dtype=np.int64),
        dp={t: np.array(v, dtype=np.float64) for t, v in dp.items()},
        skipped=skipped,
    )


def write_rows(job: Job, dest: Path, fmt: str, columns: list[str], extra) -> None:
    """The per-sample file, streamed from the chunk files; extra(row) adds columns (the reference
    flags)."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore") if fmt == "csv" else None
            if w:
                w.writeheader()
            for c in range(job.n_chunks):
                for r in read_chunk(chunk_path(job.work, c))[1]:
                    r |= extra(r)
                    w.writerow(r) if w else f.write(json.dumps(r) + "\n")

    atomic_write(dest, write)


def choose(
    select: str, k: int | None, dp: np.ndarray, threshold: float | None, seed: int
) -> np.ndarray:
    """Indices into dp of the selected samples: the k highest, k lowest, k at random (seeded), or
    those above the reference threshold (the k highest of them when k is given). NaN (no base
    response) is never chosen."""
    ok = np.flatnonzero(np.isfinite(dp))
    if select == "above-reference":
        ok = ok[dp[ok] > threshold]
        select, k = "top", min(k or len(ok), len(ok))
    if k > len(ok):
        raise UserError(
            f"--k {k} but only {len(ok)} samples have a ΔP: choose --k {len(ok)} or less"
        )
    if select == "random":
        return np.sort(np.random.default_rng(seed).choice(ok, size=k, replace=False))
    order = np.argsort(-dp[ok] if select == "top" else dp[ok], kind="stable")
    return ok[order[:k]]


def write_selection(dest: Path, chosen: dict[Path, set[int]]) -> None:
    """The chosen lines of each file, byte for byte, in file and line order."""

    def write(tmp):
        with open(tmp, "wb") as o:
            for src, lines in chosen.items():
                with open(src, "rb") as f:
                    for n, raw in enumerate(f, start=1):
                        if n in lines:
                            o.write(raw if raw.endswith(b"\n") else raw + b"\n")

    atomic_write(dest, write)


def plot_histograms(
    values: dict[str, dict[str, np.ndarray]],
    probes: list[Probe],
    out: Path,
    thresholds: dict[str, float],
) -> list[Path]:
    """One PNG per trait: the ΔP histogram of each file, overlaid (like the paper's Figure 9)."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    for p in probes:
        fig, ax = plt.subplots(figsize=(6, 4))
        finite = {name: v[p.trait][np.isfinite(v[p.trait])] for name, v in values.items()}
        allv = np.concatenate([v for v in finite.values() if len(v)] or [np.zeros(1)])
        bins = np.linspace(allv.min(), allv.max() + 1e-9, 40)
        for name, v in finite.items():
            ax.hist(
                v,
                bins=bins,
                alpha=0.5,
                density=True,
                label=f"{name} (n={len(v)}, mean {v.mean():+.2f})" if len(v) else name,
            )
        if p.trait in thresholds:
            ax.axvline(
                thresholds[p.trait], color="k", linestyle="--", label="reference 95th percentile"
            )
        ax.set_xlabel(f"ΔP on {p.trait}, layer {p.layer}")
        ax.set_ylabel("density")
        paths.append(save_figure(plt, fig, ax, out / f"flag_{p.trait}.png"))
    return paths


def _describe_skipped(skipped: dict) -> str:
    return "; ".join(
        f"{v['count']} {k} (line{'s' if v['count'] > 1 else ''} "
        f"{', '.join(map(str, v['first_lines']))}{', ...' if v['count'] > 5 else ''})"
        for k, v in skipped.items()
    )


def finish(
    jobs: list[Job],
    probes: list[Probe],
    out: Path,
    fmt: str,
    select: str | None,
    k: int | None,
    select_out: Path | None,
    select_trait: str,
    seed: int,
    model: str,
) -> dict:
    """All chunks are done: check the selection first, then write every output (each atomically)."""
    traits = [p.trait for p in probes]
    print(f"flag: every chunk is scored; writing the outputs to {out}", file=sys.stderr)
    got = {job.src: collect(job, traits) for job in jobs}
    for job in jobs:
        if len(got[job.src]["lines"]) == 0:
            raise UserError(
                f"{job.src}: no line could be scored "
                f"({_describe_skipped(got[job.src]['skipped'])}); "
                'each line needs {"messages": [...]} ending in an assistant turn'
            )
    ref = next((j for j in jobs if j.reference), None)
    thresholds = (
        {t: float(np.nanquantile(got[ref.src]["dp"][t], 0.95)) for t in traits} if ref else {}
    )
    data = [j for j in jobs if not j.reference]
    chosen = None
    if select:
        dp = np.concatenate([got[j.src]["dp"][select_trait] for j in data])
        # file i holds dp[starts[i]:starts[i+1]]
        starts = np.cumsum([0] + [len(got[j.src]["lines"]) for j in data])
        idx = choose(select, k, dp, thresholds.get(select_trait), seed)
        chosen = {
            j.src: set(got[j.src]["lines"][idx[(idx >= a) & (idx < b)] - a].tolist())
            for j, a, b in zip(data, starts[:-1], starts[1:])
        }

    columns = ["line", "prompt_tokens", "response_tokens", "base_tokens"]
    columns += [
        f"{t}_{c}"
        for t in traits
        for c in ("delta_p", "projection", "base_projection", "prompt_last")
    ]
    columns += [f"{t}_above_reference" for t in thresholds]
    outputs, summary = (
        {},
        dict(
            model=model,
            traits={p.trait: dict(layer=p.layer, vector=str(p.path)) for p in probes},
            files={},
        ),
    )
    for job in jobs:
        g = got[job.src]
        dest = out / f"{job.src.stem}.flag.{fmt}"
        write_rows(
            job,
            dest,
            fmt,
            columns,
            lambda r: {
                f"{t}_above_reference": None if r[f"{t}_delta_p"] is None else r[f"{t}_delta_p"] > x
                for t, x in thresholds.items()
            },
        )
        outputs[str(job.src)] = dest
        entry = dict(
            per_sample=str(dest),
            reference=job.reference,
            scored=int(len(g["lines"])),
            skipped=g["skipped"],
            traits={},
        )
        for t in traits:
            entry["traits"][t] = summarize(g["dp"][t])
            entry["traits"][t]["no_base_response"] = int(np.isnan(g["dp"][t]).sum())
            if t in thresholds:
                finite = g["dp"][t][np.isfinite(g["dp"][t])]
                entry["traits"][t]["above_reference"] = float(np.mean(finite > thresholds[t]))
        summary["files"][str(job.src)] = entry
    if thresholds:
        summary["reference_95th_percentile"] = thresholds
    if chosen is not None:
        write_selection(select_out, chosen)
        summary["selection"] = dict(
            select=select,
            k=k,
            trait=select_trait,
            file=str(select_out),
            n=sum(len(v) for v in chosen.values()),
        )
    summary_path = out / "flag_summary.json"
    atomic_write(summary_path, lambda p: p.write_text(json.dumps(summary, indent=1)))
    plots = plot_histograms({j.src.name: got[j.src]["dp"] for j in jobs}, probes, out, thresholds)

    for job in jobs:
        e = summary["files"][str(job.src)]
        print(
            f"{job.src}{' (reference)' if job.reference else ''}: {e['scored']} samples scored"
            + (f"; skipped {_describe_skipped(e['skipped'])}" if e["skipped"] else ""),
            file=sys.stderr,
        )
        for t, r in e["traits"].items():
            if r["n"] == 0:
                print(f"  {t}: no sample has a base response", file=sys.stderr)
                continue
            print(
                f"  {t} (layer {summary['traits'][t]['layer']}): ΔP mean {r['mean']:+.3f} "
                f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}], quantiles 5/25/50/75/95 % "
                f"{r['q05']:+.2f} {r['q25']:+.2f} {r['q50']:+.2f} {r['q75']:+.2f} {r['q95']:+.2f}"
                + (
                    f"; {100 * r['above_reference']:.1f} % above the reference's 95th percentile"
                    if "above_reference" in r
                    else ""
                )
                + (
                    f"; {r['no_base_response']} without a base response"
                    if r["no_base_response"]
                    else ""
                ),
                file=sys.stderr,
            )
    if chosen is not None:
        print(
            f"selected {summary['selection']['n']} samples "
            f"({select} on {select_trait}) -> {select_out}",
            file=sys.stderr,
        )
    print(
        f"wrote {', '.join(str(p) for p in outputs.values())}, {summary_path}"
        + "".join(f", {p}" for p in plots),
        file=sys.stderr,
    )
    return dict(
        complete=True,
        outputs=outputs,
        summary=summary_path,
        plots=plots,
        selection=select_out if chosen else None,
        stats=summary,
    )


# --------------------------------------------------------------------------------------------------
# The commands.


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'I/N' (0 <= I < N), else torchrun's RANK/WORLD_SIZE, else (0, 1).

    >>> parse_shard("2/4"), parse_shard(None)
    ((2, 4), (0, 1))
    """
    if shard is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)
    i, sep, n = str(shard).partition("/")
    if not (sep and i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise UserError(f"--shard {shard!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def own_outputs(jobs: list, probes: list[Probe], out_dir: Path, fmt: str) -> dict[Path, str]:
    """The files every flag run writes -> what each is: a per-sample file per input, the summary, a
    histogram per trait."""
    outputs = {
        out_dir / f"{j.src.stem}.flag.{fmt}": f"the per-sample file of {j.src}" for j in jobs
    }
    outputs[out_dir / "flag_summary.json"] = "the summary"
    return outputs | {out_dir / f"flag_{p.trait}.png": f"the {p.trait} histogram" for p in probes}


def flag(
    files: list[str],
    trait: list[str] | None = None,
    model: str = DEFAULT_MODEL,
    layer: int | None = None,
    base_temperature: float = 0.0,
    base_top_p: float = 1.0,
    base_samples: int = 1,
    max_new_tokens: int = 200,
    max_tokens: int = 2048,
    out: str | None = None,
    format: str = "csv",
    select: str | None = None,
    k: int | None = None,
    select_out: str | None = None,
    select_trait: str | None = None,
    reference: str | None = None,
    shard: str | None = None,
    batch_size: int | None = None,
    chunk_size: int = 1024,
    seed: int = 0,
    vectors: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    merge_only: bool = False,
    force: bool = False,
) -> dict:
    """ΔP, raw projection and prompt-last projection of every sample of JSONL files
    ({"messages": [...]} per line) on each trait's vector -> per-sample files, a summary per file,
    histograms, and optionally a selection.

    Base responses y' are greedy (base_temperature 0), or `base_samples` responses sampled at
    base_temperature and averaged. select: "top" / "bottom" / "random" k samples, or
    "above-reference": those above the 95th percentile of the `reference` file's ΔP; on
    select_trait (default: the first trait), written unchanged to select_out (an existing file only
    with force; never an input). Returns {"complete": False, ...} when other shards still have
    chunks to do.
    """
    srcs = [Path(f) for f in files]
    if not srcs:
        raise UserError("no input file: give one or more JSONL files")
    for src in srcs + ([Path(reference)] if reference else []):
        if not src.is_file():
            raise UserError(f"{src} does not exist")
    stems = [s.stem for s in srcs + ([Path(reference)] if reference else [])]
    if len(set(stems)) < len(stems):
        raise UserError(
            f"two inputs share a name ({', '.join(stems)}): their outputs would collide; rename one"
        )
    if (
        base_samples < 1
        or max_new_tokens < 1
        or chunk_size < 1
        or (batch_size is not None and batch_size < 1)
    ):
        raise UserError(
            "--base-samples, --max-new-tokens, --chunk-size and --batch-size must be at least 1"
        )
    if base_samples > 1 and base_temperature == 0:
        raise UserError(
            "--base-samples > 1 needs --base-temperature > 0: greedy responses are all the same"
        )
    if select not in (None,) + SELECT:
        raise UserError(f"--select must be one of {', '.join(SELECT)}")
    if select in ("top", "bottom", "random") and (k is None or k < 1):
        raise UserError(f"--select {select} needs --k N (N >= 1)")
    if select == "above-reference" and not reference:
        raise UserError("--select above-reference needs --reference CLEAN.jsonl")
    if (k is not None or select_out) and not select:
        raise UserError("--k and --select-out need --select top|bottom|random|above-reference")
    if format not in ("csv", "jsonl"):
        raise UserError(f"--format must be csv or jsonl, not {format!r}")
    shard_i, shard_n = parse_shard(shard)
    out_dir = Path(out or "flags")
    sel_path = Path(select_out) if select_out else out_dir / f"selected_{select}_{k or 'all'}.jsonl"
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model)
    trait = list(trait or traits_in(vectors_dir))
    if not trait:
        raise UserError(
            f"no vectors in {vectors_dir}: run `python persona_vectors.py "
            "extract TRAIT` first, or pass --trait and --vectors DIR"
        )
    probes = load_probes(trait, vectors_dir, layer, model)
    select_trait = select_trait or probes[0].trait
    if select and select_trait not in [p.trait for p in probes]:
        raise UserError(
            f"--select-trait {select_trait} is not among the "
            f"traits ({', '.join(p.trait for p in probes)})"
        )

    settings = Settings(
        model,
        str(dtype).removeprefix("torch.") if dtype else None,
        float(base_temperature),
        float(base_top_p),
        int(base_samples),
        int(max_new_tokens),
        int(max_tokens),
        int(chunk_size),
        int(seed),
    )
    jobs = []
    for src, is_ref in [(s, False) for s in srcs] + (
        [(Path(reference), True)] if reference else []
    ):
        n, filled = count_lines(src)
        if filled == 0:
            raise UserError(f"{src} is empty: nothing to flag")
        key = work_key(src, settings, probes)
        jobs.append(Job(src, n, filled, key, work_dir(out_dir, src, key), chunk_size, is_ref))
    if select in ("top", "bottom", "random"):
        available = sum(j.filled for j in jobs if not j.reference)
        if k > available:
            raise UserError(
                f"--k {k} but the data has only {available} "
                f"non-blank lines: choose --k {available} or less"
            )

    # The folders this run makes (out_dir, its work folders, --select-out's) go again if it fails
    # while they are empty.
    with made_dirs(*(j.work for j in jobs)):
        check_writable(out_dir)
        inputs, outputs = [j.src for j in jobs], own_outputs(jobs, probes, out_dir, format)
        for i, dest in enumerate(outputs):  # rewritten by every run, but never over an input
            check_output(dest, force=True, inputs=inputs, taken=dict(list(outputs.items())[:i]))
        if select:  # nor over another output of this run, whatever --force says
            check_output(
                sel_path,
                force=force or not select_out,
                inputs=inputs,
                option="--select-out",
                taken={out_dir: "the output folder"} | outputs,
            )
        if not merge_only and any(j.missing() for j in jobs):
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            if (
                device is None and shard is None and shard_n > 1 and torch.cuda.is_available()
            ):  # a torchrun rank
                device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            lm, tok = checkpoint.load(model, device, dtype)
            check_new_tokens(lm, max_new_tokens)  # before any work
            for p in probes:
                check_fits(
                    p.vector,
                    p.meta,
                    p.path,
                    lm.config.num_hidden_layers,
                    lm.config.hidden_size,
                    lm,
                )
            bs = batch_size or (64 if lm.lm_head.weight.device.type == "cuda" else 16)
            print(
                f"flag: {', '.join(f'{p.trait} (layer {p.layer})' for p in probes)}; "
                "base responses "
                + (
                    "greedy"
                    if base_temperature == 0
                    else f"{base_samples} sampled at temperature {base_temperature}"
                )
                + f", up to {max_new_tokens} tokens; batches of {bs}",
                file=sys.stderr,
            )
            for job in jobs:
                # one run of a shard at a time
                with locked(job.work, name=f".lock-{shard_i}-of-{shard_n}"):
                    score_job(lm, tok, probes, job, settings, bs, (shard_i, shard_n))

        missing = {str(j.src): j.missing() for j in jobs if j.missing()}
        if missing:
            where = "; ".join(
                f"{src}: chunks {', '.join(map(str, m[:10]))}{' ...' if len(m) > 10 else ''} of "
                f"{next(j.n_chunks for j in jobs if str(j.src) == src)}"
                for src, m in missing.items()
            )
            if merge_only or shard_n == 1:
                other = [
                    f"{j.src}: {d}"
                    for j in jobs
                    if len(j.missing()) == j.n_chunks and (d := j.other_settings())
                ]
                if other:
                    raise UserError(
                        f"{out_dir / '.work'} has chunks made with other "
                        f"settings ({'; '.join(other)}): run flag-merge "
                        "with the same arguments as the `flag` run"
                    )
                raise UserError(
                    f"not every chunk is scored yet ({where}): run `flag` with the same arguments "
                    "(each --shard I/N) until all are done"
                )
            print(
                f"flag: shard {shard_i}/{shard_n} done; other shards still have {where}. The last "
                "shard to finish writes the outputs (or run `flag-merge` with the same arguments)",
                file=sys.stderr,
            )
            return dict(complete=False, missing=missing)
        return finish(
            jobs,
            probes,
            out_dir,
            format,
            select,
            k,
            sel_path if select else None,
            select_trait,
            seed,
            model,
        )


def flag_merge(
    files: list[str],
    trait: list[str] | None = None,
    model: str = DEFAULT_MODEL,
    layer: int | None = None,
    base_temperature: float = 0.0,
    base_top_p: float = 1.0,
    base_samples: int = 1,
    max_new_tokens: int = 200,
    max_tokens: int = 2048,
    out: str | None = None,
    format: str = "csv",
    select: str | None = None,
    k: int | None = None,
    select_out: str | None = None,
    select_trait: str | None = None,
    reference: str | None = None,
    chunk_size: int = 1024,
    seed: int = 0,
    vectors: str | None = None,
    dtype: torch.dtype | str | None = None,
    force: bool = False,
) -> dict:
    """Write the outputs of a sharded `flag` run from its finished chunks (same arguments as
    `flag`); loads no model."""
    return flag(
        files,
        trait,
        model,
        layer,
        base_temperature,
        base_top_p,
        base_samples,
        max_new_tokens,
        max_tokens,
        out,
        format,
        select,
        k,
        select_out,
        select_trait,
        reference,
        chunk_size=chunk_size,
        seed=seed,
        vectors=vectors,
        dtype=dtype,
        merge_only=True,
        force=force,
    )


def add_commands(sub) -> None:
    """Register `flag` and `flag-merge` on an argparse subparsers object (python -m apps)."""

    def shared(sp):  # flag-merge takes flag's arguments, to find the same outputs
        sp.add_argument(
            "files",
            nargs="+",
            type=cli.TEXT_FILE,
            help='JSONL files, one {"messages": [...]} per line',
        )
        sp.add_argument(
            "--trait",
            action="append",
            default=None,
            help=(
                "trait (or vector .safetensors file); "
                "repeatable (default: every vector of the model)"
            ),
        )
        sp.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local directory")
        sp.add_argument("--layer", type=cli.layer_or_sweep, default=None, help=cli.HELP["layer"])
        sp.add_argument(
            "--base-temperature",
            type=cli.TEMPERATURE,
            default=0.0,
            help="0 = greedy base responses (default)",
        )
        sp.add_argument("--base-top-p", type=cli.TOP_P, default=1.0)
        sp.add_argument(
            "--base-samples", type=cli.COUNT, default=1, help="base responses per prompt, averaged"
        )
        sp.add_argument(
            "--max-new-tokens",
            type=cli.MAX_NEW_TOKENS,
            default=200,
            help="length limit of base responses",
        )
        sp.add_argument(
            "--max-tokens",
            type=cli.bounded("max_tokens"),
            default=2048,
            help="longer samples (prompt + response) are skipped and counted",
        )
        sp.add_argument(
            "--out", type=cli.OUTPUT_DIR, default=None, help="output directory (default: flags/)"
        )
        sp.add_argument(
            "--format", choices=["csv", "jsonl"], default="csv", help="per-sample files"
        )
        sp.add_argument("--select", choices=SELECT, default=None)
        sp.add_argument("--k", type=cli.COUNT, default=None, help="how many samples to select")
        sp.add_argument(
            "--select-out",
            type=cli.OUTPUT_FILE,
            default=None,
            help="JSONL of the selected lines, unchanged",
        )
        sp.add_argument(
            "--force", action="store_true", help="overwrite an existing --select-out file"
        )
        sp.add_argument(
            "--select-trait", default=None, help="the trait to select on (default: the first)"
        )
        sp.add_argument(
            "--reference",
            type=cli.TEXT_FILE,
            default=None,
            help="a clean JSONL file: flag samples above its 95th percentile of ΔP",
        )
        sp.add_argument(
            "--chunk-size", type=cli.COUNT, default=1024, help="lines per resumable chunk"
        )
        sp.add_argument("--seed", type=cli.SEED, default=0)
        sp.add_argument(
            "--vectors",
            default=None,
            help="directory of vector files (default: vectors/<model name>/)",
        )
        sp.add_argument(
            "--dtype",
            type=cli.torch_dtype,
            default=None,
            help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)",
        )

    f = sub.add_parser(
        "flag", help="ΔP of training samples and datasets: which data would teach a trait"
    )
    shared(f)
    f.add_argument(
        "--shard",
        default=None,
        help="I/N: score chunks c with c %% N == I (default: torchrun's RANK/WORLD_SIZE, else all)",
    )
    f.add_argument(
        "--batch-size", type=cli.COUNT, default=None, help="default: 64 on CUDA, 16 on CPU"
    )
    f.add_argument("--device", default=None)
    f.set_defaults(
        run=lambda a: flag(
            a.files,
            trait=a.trait,
            model=a.model,
            layer=a.layer,
            base_temperature=a.base_temperature,
            base_top_p=a.base_top_p,
            base_samples=a.base_samples,
            max_new_tokens=a.max_new_tokens,
            max_tokens=a.max_tokens,
            out=a.out,
            format=a.format,
            select=a.select,
            k=a.k,
            select_out=a.select_out,
            select_trait=a.select_trait,
            reference=a.reference,
            shard=a.shard,
            batch_size=a.batch_size,
            chunk_size=a.chunk_size,
            seed=a.seed,
            vectors=a.vectors,
            device=a.device,
            dtype=a.dtype,
            force=a.force,
        )
    )
    m = sub.add_parser(
        "flag-merge", help="write the outputs of a sharded flag run (same arguments)"
    )
    shared(m)
    m.set_defaults(
        run=lambda a: flag_merge(
            a.files,
            trait=a.trait,
            model=a.model,
            layer=a.layer,
            base_temperature=a.base_temperature,
            base_top_p=a.base_top_p,
            base_samples=a.base_samples,
            max_new_tokens=a.max_new_tokens,
            max_tokens=a.max_tokens,
            out=a.out,
            format=a.format,
            select=a.select,
            k=a.k,
            select_out=a.select_out,
            select_trait=a.select_trait,
            reference=a.reference,
            chunk_size=a.chunk_size,
            seed=a.seed,
            vectors=a.vectors,
            dtype=a.dtype,
            force=a.force,
        )
    )
