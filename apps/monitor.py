"""`monitor`: where each assistant turn of a file of conversations falls along each persona vector,
and the gauges that `chat` and `serve` show after each reply.

    python -m apps monitor chats.jsonl --trait evil --tokens      # -> chats.monitor.jsonl

A gauge reads a trait's unit vector at one layer: the projection of the last token before the reply
(the paper's predictor of the trait the reply will show) and of the reply's mean activation, beside
where extraction's neg and pos answers fell. The file is streamed, one conversation at a time; each
turn is read by one forward pass.
"""

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import model as M
import persona_vectors as pv
from support import UserError, cli
from support.files import (
    atomic_write,
    check_fits,
    check_output,
    default_vectors_dir,
    jsonl_conversations,
    load_vector,
    resolve_layer,
    sweep_path,
    traits_in,
    vector_file,
)
from support.hub import DEFAULT_MODEL


@dataclass
class Gauge:
    """One trait's direction at one layer, with where extraction's pos and neg answers fell along
    it."""

    trait: str
    layer: int
    unit: torch.Tensor  # [hidden], |unit| = 1
    # {"prompt_last": (neg, pos), "response_avg": (neg, pos)}, None when the file has no reference
    marks: dict

    @classmethod
    def from_file(
        cls, path: Path, layer: int | None, n_layers: int, hidden: int | None = None, model=None
    ) -> "Gauge":
        vec, meta = load_vector(path)
        if hidden is not None:
            check_fits(vec, meta, path, n_layers, hidden, model)
        L = resolve_layer(layer, meta, n_layers, path)
        marks = {
            k: (meta[f"neg_{k}_projection"][L], meta[f"pos_{k}_projection"][L])
            if f"pos_{k}_projection" in meta
            else None
            for k in ("prompt_last", "response_avg")
        }
        return cls(meta.get("trait", path.stem), L, pv.unit(vec[L]), marks)

    def read(self, acts: dict) -> dict:
        """acts: {"prompt_last", "response_avg"} [1, N + 1, hidden] (a Capture's, or
        `read_answers`')."""
        return {
            k: float(pv.project(acts[k][0, self.layer].cpu(), self.unit))
            for k in ("prompt_last", "response_avg")
        }


def gauges_for(model, vectors_dir: Path, names: list[str] | None, layer: int | None) -> list[Gauge]:
    """A gauge per trait name or vector file (default: every vector in the directory), each checked
    to fit."""
    paths = [
        vector_file(n, vectors_dir) for n in (traits_in(vectors_dir) if names is None else names)
    ]
    c, swept = model.config, [p for p in paths if sweep_path(p, {}).is_file()]

    def at(p: Path):  # --layer sweep: each trait's own sweep; one never swept: its default layer
        if layer != "sweep" or p in swept or not swept:  # none swept: sweep_layer says what to run
            return layer
        print(
            f"note: --layer sweep: {p.name} has no sweep result; read at its default layer",
            file=sys.stderr,
        )
        return None

    return [Gauge.from_file(p, at(p), c.num_hidden_layers, c.hidden_size, model) for p in paths]


def token_strip(tokens: list[str], values: list[float], center: float, scale: float) -> str:
    """Each token followed by its sign and a 0-9 magnitude of (value - center) / scale, e.g. 'Sure+2
    ,-0'.

    >>> token_strip(["Hi", " you"], [3.0, -1.0], center=1.0, scale=1.0)
    'Hi+6  you-6'
    """
    out = []
    for tk, v in zip(tokens, values):
        z = (v - center) / scale if scale > 0 else 0.0
        out.append(f"{tk.replace(chr(10), '⏎')}{'+' if z >= 0 else '-'}{min(9, int(abs(z) * 3))}")
    return " ".join(out)


@torch.no_grad()
def read_turn(
    model, tok, messages: list[dict], i: int, token_layers=()
) -> tuple[M.Capture, int, list[int]] | str:
    """Assistant turn messages[i] read by the model after the turns before it -> (its Capture, the
    prompt's length, the reply's tokens), or why it is skipped."""
    prompt, reply = tok.encode_chat(messages[:i]), tok.encode(messages[i]["content"])
    context = model.config.max_position_embeddings
    if not reply:
        return "an empty reply"
    if len(prompt) + len(reply) > context:
        return f"a turn longer than the model's context ({context} tokens)"
    device, cap = model.lm_head.weight.device, M.Capture(token_layers=token_layers)
    model(
        torch.tensor([prompt + reply], device=device),
        answer_start=torch.tensor([len(prompt)], device=device),
        capture=cap,
        logits="none",
    )
    return cap, len(prompt), reply


def turn_rows(
    cap: M.Capture,
    n_prompt: int,
    reply: list[int],
    tok,
    gauges: list[Gauge],
    where: dict,
    tokens: bool,
) -> list[dict]:
    """One row per gauge for a read turn (`where`: its conversation, line and turn); with tokens,
    each reply token's projection too, printed as a strip centred between extraction's neg and pos
    means."""
    acts, rows = {"prompt_last": cap.prompt_last(), "response_avg": cap.answer_mean()}, []
    for g in gauges:
        rows.append(dict(where, trait=g.trait, layer=g.layer, **g.read(acts)))
        if tokens:
            per_token = pv.project(cap.tokens[g.layer][0][0, n_prompt:].cpu(), g.unit).tolist()
            pieces = [tok.decode([x], skip_special_tokens=False) for x in reply]
            rows[-1] |= dict(tokens=pieces, token_projections=[round(v, 4) for v in per_token])
            mark = g.marks["response_avg"]
            center, scale = (
                (sum(mark) / 2, abs(mark[1] - mark[0]) / 2)
                if mark
                else (sum(per_token) / len(per_token), 1.0)
            )
            print(
                f"conversation {where['conversation']} turn "
                f"{where['turn']} [{g.trait} L{g.layer}]: "
                + token_strip(pieces, per_token, center, scale)
            )
    return rows


def conversation_rows(
    model,
    tok,
    gauges: list[Gauge],
    messages: list[dict],
    turns: list[int],
    where: dict,
    tokens: bool,
    skipped: dict,
) -> list[dict]:
    """The rows of every assistant turn of one conversation (a turn that cannot be read is counted
    in `skipped`)."""
    rows, layers = [], tuple(sorted({g.layer for g in gauges})) if tokens else ()
    for k, i in enumerate(turns, start=1):
        turn = read_turn(model, tok, messages, i, layers)
        if isinstance(turn, str):
            skipped.setdefault(turn, []).append(where["line"])
        else:
            rows += turn_rows(*turn, tok, gauges, where | dict(turn=k), tokens)
    return rows


def monitor_rows(
    src: Path, model, tok, gauges: list[Gauge], tokens: bool, skipped: dict, counts: dict
):
    """Every row of the file, a conversation at a time (counts: "rows" and "conversations" so
    far)."""
    t0 = time.time()
    for lineno, messages, turns in jsonl_conversations(src, skipped):
        where = dict(conversation=counts["conversations"], line=lineno)
        rows = conversation_rows(model, tok, gauges, messages, turns, where, tokens, skipped)
        yield from rows
        counts["rows"], counts["conversations"] = (
            counts["rows"] + len(rows),
            counts["conversations"] + bool(rows),
        )
        if rows and counts["conversations"] % 50 == 0:
            print(
                f"monitor: {counts['conversations']} conversations "
                f"({counts['conversations'] / (time.time() - t0):.1f}/s)",
                file=sys.stderr,
            )


def write_rows(path: Path, rows, as_csv: bool) -> None:
    """Rows as JSONL, or as CSV with the columns of a gauge's reading (per-token projections: JSONL
    only)."""
    with open(path, "w", newline="") as o:
        w = (
            csv.DictWriter(
                o,
                ["conversation", "line", "turn", "trait", "layer", "prompt_last", "response_avg"],
                extrasaction="ignore",
            )
            if as_csv
            else None
        )
        if w:
            w.writeheader()
        for r in rows:
            w.writerow(r) if w else o.write(json.dumps(r) + "\n")


def monitor(
    file: str,
    model: str = DEFAULT_MODEL,
    trait: list[str] | None = None,
    layer: int | None = None,
    vectors: str | None = None,
    out: str | None = None,
    tokens: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Per assistant turn of each conversation in a JSONL file ({"messages": [...]} per line): the
    projection of the last token before the reply and of the reply's mean, on each persona vector ->
    a JSONL (or .csv) file.

    The file is streamed (one conversation in memory at a time). With tokens=True each reply's
    per-token projections are saved and printed as a strip (see `token_strip`), centred between
    extraction's neg and pos means. Lines that cannot be used (not JSON, no messages, unknown roles,
    no assistant turn after a user turn), empty replies and turns longer than the model's context
    are skipped and counted, with their line numbers.
    """
    src = Path(file)
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model)
    names = traits_in(vectors_dir) if trait is None else trait
    read = [src, *(vector_file(n, vectors_dir, check=False) for n in names)]  # never written over
    dest = check_output(Path(out) if out else src.with_suffix(".monitor.jsonl"), force, inputs=read)
    lm, tok, vectors_dir, _ = pv.load_checked(model, device, dtype, [], vectors)
    if trait is None and not traits_in(vectors_dir):
        raise UserError(
            f"no vectors in {vectors_dir}: run `extract TRAIT` first or pass --vectors DIR"
        )
    gauges = gauges_for(lm, vectors_dir, trait, layer)
    skipped, counts = {}, dict(rows=0, conversations=0)

    def write(tmp: Path):
        write_rows(
            tmp,
            monitor_rows(src, lm, tok, gauges, tokens, skipped, counts),
            dest.suffix == ".csv",
        )
        if counts["conversations"] == 0:  # raised inside, so that no output file is left behind
            raise UserError(
                f"{src}: no conversation with a usable assistant turn (skipped: "
                + ("; ".join(f"{len(v)} with {k}" for k, v in skipped.items()) or "none")
                + ")"
            )

    atomic_write(dest, write)
    notes = "".join(
        f"; skipped {len(v)} ({k}; line{'s' if len(v) > 1 else ''} "
        f"{', '.join(map(str, v[:5]))}{', ...' if len(v) > 5 else ''})"
        for k, v in skipped.items()
    )
    print(
        f"monitor: {counts['rows']} rows for "
        f"{counts['conversations']} conversations -> {dest}{notes}",
        file=sys.stderr,
    )
    return dest


def add_commands(sub) -> None:
    """Register `monitor` on the command line's subparsers (python -m apps)."""
    c = sub.add_parser("monitor", help="projections of each assistant turn of JSONL conversations")
    c.add_argument("file", type=cli.TEXT_FILE, help='JSONL, one {"messages": [...]} per line')
    c.add_argument("--model", default=DEFAULT_MODEL, help=cli.HELP["model"])
    c.add_argument(
        "--trait",
        action="append",
        default=None,
        help="repeatable (default: every vector of the model)",
    )
    c.add_argument("--layer", type=cli.layer_or_sweep, default=None, help=cli.HELP["layer"])
    c.add_argument("--vectors", default=None, help=cli.HELP["vectors"])
    c.add_argument(
        "--out",
        type=cli.OUTPUT_FILE,
        default=None,
        help="output .jsonl or .csv (default: FILE.monitor.jsonl)",
    )
    c.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    c.add_argument(
        "--tokens",
        action="store_true",
        help="per-token projections of each reply (printed and saved)",
    )
    c.add_argument("--device", default=None, help=cli.HELP["device"])
    c.add_argument("--dtype", type=cli.torch_dtype, default=None, help=cli.HELP["dtype"])
    c.set_defaults(
        run=lambda a: monitor(
            a.file,
            model=a.model,
            trait=a.trait,
            layer=a.layer,
            vectors=a.vectors,
            out=a.out,
            tokens=a.tokens,
            device=a.device,
            dtype=a.dtype,
            force=a.force,
        )
    )
