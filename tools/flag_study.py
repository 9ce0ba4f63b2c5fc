"""Does ΔP pick out the data that teaches a trait? AUROC, precision@k, dataset ΔP of mixes and,
with --finetune, dataset ΔP against the finetuning shift of models trained on them, on the default
model.

    python tools/flag_study.py  # evil, 120 questions answered here, then flagged
    python tools/flag_study.py --data evil.jsonl normal.jsonl  # datasets from `make-dataset`
    python tools/flag_study.py --data out/train_study/data/evil.jsonl \
        out/train_study/data/normal.jsonl --vectors out/train_study/vectors \
        --val out/train_study/data/neutral.jsonl --finetune --layer-sweep

Data (without --data): n requests that neither the trait's extraction nor its evaluation uses
(make-dataset's pool of everyday requests, or --questions-file, or else the other trait files'
questions), each answered by the model itself twice, sampled: under the trait's pos system prompts
(trait data) and under its neg ones (normal data), saved WITHOUT the system prompt, as
`make-dataset` does. Both files are then flagged twice with the real pipeline (flagging.flag):
greedy base responses, and --base-samples sampled ones. Reported: AUROC of ΔP, of the raw
projection, and of the raw projection minus the last prompt token's (no base response needed) for
trait vs normal samples; precision@k; mean ΔP of each file; and dataset ΔP of 0/25/50/75/100 %
mixes (the mean of their samples' ΔP; the mix files are written too). --layer-sweep: the AUROCs at
every layer. --finetune: train.py on each mix and on the top / random / bottom --select-k samples of
both files (chosen by `flag --select`), each model's finetuning shift, r of dataset ΔP against the
shift with a random-direction control, and a scatter plot. Needs the trait's vector: it is extracted
first (judge none) when missing. Every step is cached under --out: a rerun redoes nothing that is
done. Outputs: study.json, and figure_data.json (every sample's ΔP, for the histogram of
tools/figures.py).
"""

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

# the project's modules live at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as M
import persona_vectors as pv
from apps import flagging
from support import UserError, checkpoint, stats
from support.files import atomic_write, default_vectors_dir, vector_path
from support.hub import DEFAULT_MODEL
from support.traits import available_traits, load_trait


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a trait sample scores above a normal one), ties counting half (the Mann-Whitney U
    statistic).

    >>> auroc(np.array([3., 4.]), np.array([1., 2.])), auroc(np.array([1.]), np.array([1.]))
    (1.0, 0.5)
    """
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def precision_at(k: int, pos: np.ndarray, neg: np.ndarray) -> float:
    """Fraction of trait samples among the k highest scores of both sets together."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return float(is_pos[np.argsort(-scores, kind="stable")[:k]].mean())


# make-dataset's pool
EVERYDAY = Path(__file__).resolve().parent.parent / "data" / "questions" / "everyday.json"


def held_out_questions(trait: str, n: int, path: Path | None = None, seed: int = 0) -> list[str]:
    """n questions, none of them among this trait's extraction or evaluation ones: from `path` (a
    JSON list, or an object with a "questions" list), else make-dataset's pool of everyday requests
    when present, else the other trait files' questions."""
    t = load_trait(trait)
    own = set(t.extract_questions) | set(t.eval_questions)
    path = path or (EVERYDAY if EVERYDAY.is_file() else None)
    if path:
        data = json.loads(Path(path).read_text())
        pool = data["questions"] if isinstance(data, dict) else data
    else:
        pool = [
            q
            for other in available_traits()
            if other != trait
            for q in load_trait(other).extract_questions + load_trait(other).eval_questions
        ]
    pool = [q for q in dict.fromkeys(pool) if q not in own]
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} held-out questions: choose --n {len(pool)} or less")
    return random.Random(seed).sample(pool, n)  # topics mixed


def make_data(
    model,
    tok,
    trait: str,
    questions: list[str],
    side: str,
    dest: Path,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch: int,
    seed: int,
) -> Path:
    """The model's answers under the pos (trait) or neg (normal) system prompts, saved without
    them."""
    if dest.exists():
        print(f"{dest}: exists, reused", file=sys.stderr)
        return dest
    t = load_trait(trait)
    lines = []
    for b in range(0, len(questions), batch):
        qs = questions[b : b + batch]
        convs = [
            [
                {"role": "system", "content": t.system_prompt(side, (b + i) % len(t.instructions))},
                {"role": "user", "content": q},
            ]
            for i, q in enumerate(qs)
        ]
        outs = M.generate(
            model,
            [tok.encode_chat(c) for c in convs],
            max_new_tokens,
            stop_ids=tok.stop_ids,
            pad_id=tok.pad_id,
            temperature=temperature,
            top_p=top_p,
            seed=seed * 7919 + b,
        )
        lines += [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": tok.decode(o)},
                    ]
                }
            )
            + "\n"
            for q, o in zip(qs, outs)
        ]
        print(f"{dest.name}: {len(lines)}/{len(questions)} answers", file=sys.stderr, flush=True)
    atomic_write(dest, lambda p: p.write_text("".join(lines)))
    return dest


def per_sample(path: Path, trait: str) -> dict[str, np.ndarray]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]

    def get(k):
        return np.array([np.nan if r[k] is None else r[k] for r in rows], dtype=np.float64)

    return dict(
        line=np.array([r["line"] for r in rows]),
        delta_p=get(f"{trait}_delta_p"),
        projection=get(f"{trait}_projection"),
        prompt_last=get(f"{trait}_prompt_last"),
    )


def greedy_pass(
    model,
    tok,
    files: list[Path],
    vec: torch.Tensor,
    layer: int,
    max_new_tokens: int,
    batch: int,
    out: Path,
) -> list[dict]:
    """Per file, from one `pv.response_and_base` pass per batch (greedy base, as `flag`'s): ΔP
    and the raw projection at every layer [n, N + 1], and the response-mean difference
    a(x, y) - a(x, y') itself at `layer` [n, hidden] (for ΔP along any direction). Cached per
    file, so a rerun skips it."""
    per_file = []
    u = vec / vec.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # [N + 1, hidden]
    for f in files:
        cache = out / f"greedy_pass_{f.stem}_L{layer}.npz"
        if cache.exists():
            per_file.append(dict(np.load(cache)))
            continue
        samples = [
            x
            for x in (
                flagging.parse_sample(raw, tok, 4096)
                for raw in f.read_bytes().splitlines()
                if raw.strip()
            )
            if not isinstance(x, str)
        ]
        dp, raw_proj, diff = [], [], []
        for b in range(0, len(samples), batch):
            acts = pv.response_and_base(
                model,
                tok,
                [x[0] for x in samples[b : b + batch]],
                [x[1] for x in samples[b : b + batch]],
                max_new_tokens,
            )
            d = acts["response"] - acts["base"]  # [B, N + 1, hidden]
            dp.append((d * u).sum(-1))  # [B, N + 1]
            raw_proj.append((acts["response"] * u).sum(-1))
            diff.append(d[:, layer])
            print(
                f"greedy pass {f.name}: {min(b + batch, len(samples))}/{len(samples)}",
                file=sys.stderr,
                flush=True,
            )
        per_file.append(
            {
                k: torch.cat(v).double().numpy()
                for k, v in (("delta_p", dp), ("projection", raw_proj), ("diff", diff))
            }
        )
        atomic_write(cache, lambda p: np.savez(open(p, "wb"), **per_file[-1]))
    return per_file


def layer_sweep(per_file: list[dict]) -> dict:
    """AUROC of ΔP and of the raw projection at every layer, trait file vs normal file
    (exploratory: the layer is chosen on the data it is scored on)."""
    t, n = per_file
    out = {}
    for L in range(1, t["delta_p"].shape[1]):
        ok_t, ok_n = np.isfinite(t["delta_p"][:, L]), np.isfinite(n["delta_p"][:, L])
        out[L] = dict(
            delta_p=auroc(t["delta_p"][ok_t, L], n["delta_p"][ok_n, L]),
            projection=auroc(t["projection"][:, L], n["projection"][:, L]),
        )
    return out


def finetune_study(
    args, out: Path, files: list[Path], mixes: dict, diffs: np.ndarray, vectors: Path, layer: int
) -> dict:
    """Does dataset ΔP predict the finetuning shift? Finetune (train.py) on each mix and on the top
    / random / bottom `--select-k` samples of both files by ΔP (chosen with `flag --select`, greedy
    base), then measure each model's finetuning shift at `layer` (pv.shift_controls: last prompt
    token, evaluation questions).

    mixes: name -> row indices into `diffs` [n_all, hidden] (the samples' a(x, y) - a(x, y') at
    `layer`, rows of the files in order). The correlation of dataset ΔP with the shift over all
    datasets gets a control: the same r with v replaced by each of 100 random unit directions u
    (dataset ΔP along u against the shift along u)."""
    import train as T
    from support.files import load_vector
    from support.traits import load_trait

    datasets = {f"mix {k}%": (out / f"mix_{k:03d}.jsonl", rows) for k, rows in mixes.items()}
    all_lines = [raw for f in files for raw in f.read_bytes().splitlines() if raw.strip()]
    if len(all_lines) != len(diffs):
        raise SystemExit(
            "some lines of the data are not samples flag can "
            "read: the finetuning study needs clean files"
        )
    lines = {
        raw: row for row, raw in reversed(list(enumerate(all_lines)))
    }  # a line's bytes -> its (first) row
    for how in ("top", "random", "bottom"):
        dest = out / f"select_{how}_{args.select_k}.jsonl"
        # the study's own files: a rerun rewrites them
        flagging.flag(
            [str(f) for f in files],
            [args.trait],
            args.model,
            max_new_tokens=args.max_new_tokens,
            out=str(out / "greedy"),
            format="jsonl",
            batch_size=args.batch_size,
            chunk_size=64,
            seed=args.seed,
            vectors=str(vectors),
            layer=layer,
            select=how,
            k=args.select_k,
            select_out=str(dest),
            force=True,
        )
        datasets[f"{how} {args.select_k}"] = (
            dest,
            [lines[raw] for raw in dest.read_bytes().splitlines()],
        )
    vec = load_vector(vector_path(vectors, args.trait))[0].double()
    v_hat = (vec[layer] / vec[layer].norm()).numpy()
    questions = load_trait(args.trait).eval_questions
    base_model, tok = checkpoint.load(args.model, "cpu", torch.float32)
    base_acts = pv.last_prompt_activations(base_model, tok, questions)
    del base_model
    res = {}
    settings = dict(
        model=args.model,
        layer=layer,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.train_batch_size,
        seed=args.seed,
        val=args.val,
    )
    for name, (path, rows) in datasets.items():
        cache = out / "finetune" / f"{path.stem}.json"
        if cache.exists() and json.loads(cache.read_text()).get("settings") != settings:
            raise SystemExit(f"{cache} was made with other finetuning settings: use another --out")
        if not cache.exists():
            print(
                f"== finetune on {path.name} ({name}, {len(rows)} conversations)",
                file=sys.stderr,
                flush=True,
            )
            run = T.train(
                str(path),
                model=args.model,
                out=str(out / "finetune" / "runs" / path.stem),
                val=args.val,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.train_batch_size,
                grad_accum=1,
                device="cpu",
                dtype="float32",
                seed=args.seed,
            )
            model, tok = checkpoint.load(str(run), "cpu", torch.float32)
            acts = pv.last_prompt_activations(model, tok, questions)
            del model
            c = pv.shift_controls(base_acts, acts, vec.float(), {})
            r = dict(
                settings=settings,
                file=str(path),
                n=len(rows),
                shift=float(c["shift"][layer]),
                random_abs_95=float(c["random_abs_95"][layer]),
                shift_vector=(acts.double().mean(0) - base_acts.double().mean(0))[layer].tolist(),
            )
            atomic_write(cache, lambda p: p.write_text(json.dumps(r)))
        r = json.loads(cache.read_text())
        r["delta_p"] = float(np.nanmean(diffs[rows] @ v_hat))
        res[name] = r
    names = list(res)
    dp = np.array([res[k]["delta_p"] for k in names])
    shift = np.array([res[k]["shift"] for k in names])
    shift_vecs = np.array([res[k]["shift_vector"] for k in names])  # [datasets, hidden]
    # [datasets, hidden]
    mean_diffs = np.array([np.nanmean(diffs[datasets[k][1]], axis=0) for k in names])
    # [100, hidden], unit
    u = stats.random_directions(100, 1.0, diffs.shape[1], args.seed).double().numpy()

    def pearson(x: np.ndarray, y: np.ndarray) -> float:
        return stats.pearson(torch.from_numpy(x), torch.from_numpy(y))

    is_mix = np.array([k.startswith("mix") for k in names])
    summary = dict(datasets=res)
    for key, keep in (("all", np.ones(len(names), bool)), ("mixes", is_mix)):
        r = pearson(dp[keep], shift[keep])
        r_rand = np.array([pearson(mean_diffs[keep] @ d, shift_vecs[keep] @ d) for d in u])
        summary[key] = dict(
            n=int(keep.sum()),
            r=r,
            random_abs_r_95=float(np.quantile(np.abs(r_rand), 0.95)),
            random_r_median=float(np.median(r_rand)),
            random_share_at_least=float(np.mean(np.abs(r_rand) >= abs(r))),
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(dp, shift)
        for k, x, y in zip(names, dp, shift):
            ax.annotate(k, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"dataset ΔP (layer {layer}, greedy base)")
        ax.set_ylabel(f"finetuning shift (layer {layer})")
        ax.set_title(
            f"{args.trait}: r = {summary['all']['r']:.2f} (random directions: 95 % |r| "
            f"{summary['all']['random_abs_r_95']:.2f})",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(out / "finetune_scatter.png", dpi=120)
        summary["plot"] = str(out / "finetune_scatter.png")
    except ImportError:
        print("matplotlib not installed: no scatter plot", file=sys.stderr)
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trait", default="evil")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--n", type=int, default=120, help="questions; each gets a trait and a normal answer"
    )
    p.add_argument(
        "--data",
        nargs=2,
        default=None,
        metavar=("TRAIT.jsonl", "NORMAL.jsonl"),
        help="existing datasets (e.g. from make-dataset) instead of generating them here",
    )
    p.add_argument(
        "--questions-file",
        default=None,
        help="JSON list of requests (default: data/questions/"
        "everyday.json when present, else the other trait files' questions)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="answer length, data and base responses alike",
    )
    p.add_argument(
        "--temperature", type=float, default=0.7, help="sampling of the data and the sampled base"
    )
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--base-samples", type=int, default=4, help="sampled base responses per prompt")
    p.add_argument("--k", type=int, default=30, help="precision@k")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="default: the vector's recorded best layer, else the middle",
    )
    p.add_argument(
        "--vectors", default=None, help="vectors directory (default: vectors/<model name>)"
    )
    p.add_argument(
        "--layer-sweep",
        action="store_true",
        help="also AUROC at every layer (one more greedy pass)",
    )
    p.add_argument(
        "--finetune",
        action="store_true",
        help="also finetune on every mix and on the top / random / "
        "bottom --select-k samples, and set dataset ΔP against the finetuning shift (needs --val)",
    )
    p.add_argument(
        "--val", default=None, help="validation JSONL for the finetunes (held-out neutral text)"
    )
    p.add_argument("--select-k", type=int, default=60)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--out", default="study/flag")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.finetune and not args.val:
        p.error("--finetune needs --val FILE (e.g. the train study's neutral.jsonl)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = Path(args.vectors) if args.vectors else default_vectors_dir(args.model)
    if not vector_path(vectors, args.trait).is_file():
        print(f"no {args.trait} vector in {vectors}: extracting it (judge none)", file=sys.stderr)
        pv.extract(args.trait, args.model, judge="none", out=str(vectors))

    if args.data:
        trait_file, normal_file = map(Path, args.data)
        source = f"given: {trait_file}, {normal_file}"
    else:
        model, tok = checkpoint.load(args.model)
        qs = held_out_questions(args.trait, args.n, args.questions_file, args.seed)
        gen = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch=args.batch_size,
            seed=args.seed,
        )
        trait_file = make_data(
            model, tok, args.trait, qs, "pos", out / f"{args.trait}.jsonl", **gen
        )
        normal_file = make_data(model, tok, args.trait, qs, "neg", out / "normal.jsonl", **gen)
        pool = args.questions_file or (EVERYDAY if EVERYDAY.is_file() else "the other trait files")
        source = (
            f"{args.n} held-out questions ({pool}), answered under the pos / neg "
            f"system prompts (saved without them), temperature {args.temperature}, "
            f"top-p {args.top_p}, up to {args.max_new_tokens} tokens"
        )
        del model

    runs = {
        "greedy base": dict(),
        f"sampled base (K={args.base_samples})": dict(
            base_temperature=args.temperature, base_top_p=args.top_p, base_samples=args.base_samples
        ),
    }
    results = dict(trait=args.trait, model=args.model, data=source, runs={})
    figure = dict(
        trait=args.trait, model=args.model, data=source, max_new_tokens=args.max_new_tokens, runs={}
    )
    for name, base in runs.items():
        r = flagging.flag(
            [str(trait_file), str(normal_file)],
            [args.trait],
            args.model,
            max_new_tokens=args.max_new_tokens,
            out=str(out / name.split()[0]),
            format="jsonl",
            batch_size=args.batch_size,
            chunk_size=64,
            seed=args.seed,
            vectors=str(vectors),
            layer=args.layer,
            **base,
        )
        pos, neg = (per_sample(r["outputs"][str(f)], args.trait) for f in (trait_file, normal_file))
        ok_p, ok_n = np.isfinite(pos["delta_p"]), np.isfinite(neg["delta_p"])
        # the prompt-last state stands in for the base response (no generation); same prompts, so
        # alone it is 0.5
        pos["cheap"], neg["cheap"] = (
            pos["projection"] - pos["prompt_last"],
            neg["projection"] - neg["prompt_last"],
        )
        scores = {
            "ΔP": "delta_p",
            "raw projection a(x,y)·v": "projection",
            "a(x,y)·v - prompt-last": "cheap",
        }
        res = dict(
            layer=r["stats"]["traits"][args.trait]["layer"],
            n_trait=int(ok_p.sum()),
            n_normal=int(ok_n.sum()),
            auroc={k: auroc(pos[v][ok_p], neg[v][ok_n]) for k, v in scores.items()},
            precision_at_k={
                k: precision_at(args.k, pos[v][ok_p], neg[v][ok_n]) for k, v in scores.items()
            },
            mean_delta_p={
                f.name: r["stats"]["files"][str(f)]["traits"][args.trait]
                for f in (trait_file, normal_file)
            },
        )
        # mixes: the first m questions' trait answers and the other questions' normal answers, each
        # question once
        n = min(len(pos["delta_p"]), len(neg["delta_p"]))
        if np.array_equal(pos["line"][:n], neg["line"][:n]):
            mixes = {}
            for frac in (0, 25, 50, 75, 100):
                m = round(n * frac / 100)
                mixes[frac] = float(
                    np.nanmean(np.concatenate([pos["delta_p"][:m], neg["delta_p"][m:n]]))
                )
            res["mix_delta_p"] = mixes
            res["mixes_ordered"] = all(
                mixes[a] < mixes[b] for a, b in zip(list(mixes)[:-1], list(mixes)[1:])
            )
        results["runs"][name] = res
        figure["runs"][name] = dict(
            layer=res["layer"],
            auroc=res["auroc"]["ΔP"],
            delta_p={
                side: [round(x, 3) for x in d["delta_p"][ok].tolist()]
                for side, d, ok in (("trait", pos, ok_p), ("normal", neg, ok_n))
            },
        )
    # for tools/figures.py
    atomic_write(out / "figure_data.json", lambda p: p.write_text(json.dumps(figure) + "\n"))

    # the mix files themselves, for finetuning (train.py), when the two files answer the same
    # requests in order
    t_lines, n_lines = trait_file.read_text().splitlines(), normal_file.read_text().splitlines()
    n = min(len(t_lines), len(n_lines))
    request = lambda x: json.loads(x)["messages"][:-1]  # noqa: E731
    mix_rows = {}  # percent -> rows of the two files together (trait file first)
    if all(request(a) == request(b) for a, b in zip(t_lines[:n], n_lines[:n])):
        for frac in (0, 25, 50, 75, 100):
            m = round(n * frac / 100)
            mix_rows[frac] = list(range(m)) + [len(t_lines) + i for i in range(m, n)]
            atomic_write(
                out / f"mix_{frac:03d}.jsonl",
                lambda p: p.write_text("".join(x + "\n" for x in t_lines[:m] + n_lines[m:n])),
            )
    atomic_write(
        out / "study.json", lambda p: p.write_text(json.dumps(results, indent=1, default=str))
    )

    print(f"\n{args.trait} on {args.model}; data: {source}")
    print(f"| base responses | score | AUROC trait vs normal | precision@{args.k} |")
    print("|---|---|---|---|")
    for name, res in results["runs"].items():
        for k in res["auroc"]:
            print(f"| {name} | {k} | {res['auroc'][k]:.3f} | {res['precision_at_k'][k]:.2f} |")
    print(
        "\n| base responses | mean ΔP, trait data [95 % CI] | mean ΔP, normal data [95 % CI] | "
        "ΔP of 0/25/50/75/100 % mixes | ordered |\n|---|---|---|---|---|"
    )
    for name, res in results["runs"].items():
        t, nrm = (res["mean_delta_p"][f.name] for f in (trait_file, normal_file))
        mixes = " / ".join(f"{v:+.2f}" for v in res.get("mix_delta_p", {}).values()) or "n/a"
        print(
            f"| {name} (layer {res['layer']}) | {t['mean']:+.2f} [{t['ci95'][0]:+.2f}, "
            f"{t['ci95'][1]:+.2f}] | {nrm['mean']:+.2f} [{nrm['ci95'][0]:+.2f}, "
            f"{nrm['ci95'][1]:+.2f}] | {mixes} | {res.get('mixes_ordered', 'n/a')} |"
        )
    if args.layer_sweep or args.finetune:
        from support.files import load_vector

        model, tok = checkpoint.load(args.model)
        vec = load_vector(vector_path(vectors, args.trait))[0]
        layer = results["runs"]["greedy base"]["layer"]
        per_file = greedy_pass(
            model,
            tok,
            [trait_file, normal_file],
            vec,
            layer,
            args.max_new_tokens,
            args.batch_size,
            out,
        )
        del model
    if args.layer_sweep:
        results["layer_sweep"] = layer_sweep(per_file)
        atomic_write(
            out / "study.json", lambda p: p.write_text(json.dumps(results, indent=1, default=str))
        )
        print(
            "\n| layer | AUROC of ΔP (greedy base) | AUROC of the raw projection |\n|---|---|---|"
        )
        for L, r in results["layer_sweep"].items():
            print(f"| {L} | {r['delta_p']:.3f} | {r['projection']:.3f} |")
    if args.finetune:
        if not mix_rows:
            raise SystemExit(
                "--finetune needs two files answering the same requests in the same order"
            )
        diffs = np.concatenate([f["diff"] for f in per_file])
        ft = finetune_study(args, out, [trait_file, normal_file], mix_rows, diffs, vectors, layer)
        results["finetune"] = ft
        atomic_write(
            out / "study.json", lambda p: p.write_text(json.dumps(results, indent=1, default=str))
        )
        print(
            f"\n| training set (layer {layer}) | conversations | dataset ΔP | finetuning shift | "
            "random 95 % |\n|---|---|---|---|---|"
        )
        for name, r in ft["datasets"].items():
            print(
                f"| {name} | {r['n']} | {r['delta_p']:+.2f} | "
                f"{r['shift']:+.2f} | {r['random_abs_95']:.2f} |"
            )
        for key, what in (("all", "all the training sets"), ("mixes", "the mixes")):
            c = ft[key]
            print(
                f"r(dataset ΔP, shift) over {what} ({c['n']}): {c['r']:.3f}; the "
                "same along 100 random directions instead of v: 95th percentile |r| "
                f"{c['random_abs_r_95']:.3f}, median r {c['random_r_median']:+.3f}, "
                f"{c['random_share_at_least']:.0%} at least as strong"
            )
    print(f"\nwrote {out / 'study.json'}")


if __name__ == "__main__":
    try:
        main()
    except (
        UserError
    ) as e:  # bad input to the pipeline it calls: one line, as the command line prints it
        raise SystemExit(f"error: {e}") from None
