"""The README's pictures, redrawn from the small result files beside them in docs/figures/.

    python tools/figures.py            # redraw every docs/figures/*.png from the .json files there
    python tools/figures.py --collect  # copy the study runs' numbers (below), then redraw

What --collect reads (each written by a study command; docs/figures.md gives the commands and their
settings):
    steering.json          the CSV of `persona_vectors.py sweep evil`, and the vector's per-layer
                           norms
    monitoring.json        the result file of
                           `persona_vectors.py monitor-experiment evil --kind system` (beside its
                           CSV), with the band of its 100 random directions
    finetuning_shift.json  out/train_study/figure_data.json, written by tools/train_study.py
    delta_p.json           out/flag_study/figure_data.json, written by tools/flag_study.py
    capping.json           written here by tools/cap_study.py itself
"""

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

# the project's modules live at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.plots import pyplot  # noqa: E402  (matplotlib, optional: collecting needs none)

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
MODEL = "SmolLM2-135M-Instruct"


# --- collecting the numbers -----------------------------------------------------------------------


def collect_sweep(sweep_csv: Path, vectors: Path, trait: str) -> dict:
    """The sweep's rows, the share of each setting's answers stuck in a loop (from its answers,
    written beside the sweep's CSV), and |v[L]|: the gap between extraction's pos and neg answers
    along the vector."""
    from sampling_study import degenerate

    from support.files import load_vector, vector_path

    rows = []
    for r in csv.DictReader(open(sweep_csv)):
        # as sweep names them
        label = f"L{r['layer']}_c{r['coef']}{'r' if r['relative'] == 'True' else ''}"
        answers = [
            a["answer"]
            for a in csv.DictReader(open(sweep_csv.parent / "eval" / f"{trait}_{label}.csv"))
        ]
        rows.append(
            dict(
                layer=int(r["layer"]),
                coef=float(r["coef"]),
                relative=r["relative"] == "True",
                projection=float(r["projection_mean"]),
                n=int(r["n"]),
                loops=sum(degenerate(a.split()) for a in answers) / len(answers),
            )
        )
    meta = load_vector(vector_path(vectors, trait))[1]
    return dict(trait=trait, rows=rows, vector_norm=meta["vector_norm"])


def collect_monitor(monitor_csv: Path) -> dict:
    """The experiment's own result file beside its CSV (TRAIT_monitor_KIND.json): each prompt's
    projection and condition, the rank correlation, and the band of mean projections along random
    unit directions."""
    r = json.loads(monitor_csv.with_suffix(".json").read_text())
    return {
        k: r[k]
        for k in ("trait", "layer", "conditions", "grade", "projection", "band_5", "band_95")
    } | dict(rho=r["rho_grade"], random_abs_rho_95=r["random_abs_rho_95"], n_random=r["n_random"])


def collect(a) -> None:
    vectors = Path(a.vectors)
    writes = {
        "steering.json": lambda: collect_sweep(Path(a.sweep), vectors, a.trait),
        "monitoring.json": lambda: collect_monitor(Path(a.monitor)),
    }
    for name, make in writes.items():
        (FIGURES / name).write_text(json.dumps(make()) + "\n")
        print(f"wrote {FIGURES / name}", file=sys.stderr)
    for src, name in ((a.train_study, "finetuning_shift.json"), (a.flag_study, "delta_p.json")):
        shutil.copyfile(Path(src) / "figure_data.json", FIGURES / name)
        print(f"copied {Path(src) / 'figure_data.json'} -> {FIGURES / name}", file=sys.stderr)


# --- drawing --------------------------------------------------------------------------------------


def steering(d: dict, fig) -> None:
    """Left: mean projection of the steered answers (read by the unsteered model) against the
    coefficient, one line per layer, in units of |v[L]| (1: as far as extraction's evil-prompted
    answers sat from its helpful-prompted ones). Right: the share of those answers stuck in a loop
    (a 4-word sequence repeated 4+ times)."""
    ax, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[3, 2]))
    for L in sorted({r["layer"] for r in d["rows"]}):
        rs = sorted((r for r in d["rows"] if r["layer"] == L), key=lambda r: r["coef"])
        base = next(r["projection"] for r in rs if r["coef"] == 0)
        x = [r["coef"] for r in rs]
        ax.plot(
            x,
            [(r["projection"] - base) / d["vector_norm"][L] for r in rs],
            marker="o",
            label=f"layer {L}",
        )
        ax2.plot(x, [100 * r["loops"] for r in rs], marker="o", label=f"layer {L}")
    ax.axhline(1, color="grey", linestyle="--", linewidth=1)
    ax.annotate(
        "extraction: evil-prompted minus helpful-prompted answers",
        (max(r["coef"] for r in d["rows"]), 1),
        xytext=(0, -4),
        textcoords="offset points",
        ha="right",
        va="top",
        fontsize=8,
        color="grey",
    )
    unit = " (x residual norm)" if d["rows"][0]["relative"] else ""
    ax.set_xlabel("steering coefficient" + unit)
    ax.set_ylabel("answers' projection on the vector\n(change from unsteered, in units of |v[L]|)")
    ax.set_title(
        f"Steered answers along the {d['trait']} vector ({d['rows'][0]['n']} questions, greedy)",
        fontsize=10,
    )
    ax.legend(fontsize="small")
    ax2.set_xlabel("steering coefficient" + unit)
    ax2.set_ylabel("% of the answers (4 words repeated 4+ times)")
    ax2.set_ylim(-2, max(30, 120 * max(r["loops"] for r in d["rows"])))
    ax2.set_title("Answers stuck in a loop", fontsize=10)


def monitoring(d: dict, fig) -> None:
    """Projection of the last prompt token against the system prompt's strength, with the
    random-direction band."""
    ax = fig.subplots()
    import random

    rng = random.Random(0)
    x = [g + rng.uniform(-0.15, 0.15) for g in d["grade"]]
    ax.scatter(x, d["projection"], s=10, alpha=0.6, label="one question (before any reply)")
    n = len(d["conditions"])
    means = [
        sum(p for p, g in zip(d["projection"], d["grade"]) if g == c)
        / max(1, sum(g == c for g in d["grade"]))
        for c in range(n)
    ]
    ax.plot(range(n), means, color="black", marker="s", label="mean of the questions")
    ax.fill_between(
        range(n),
        d["band_5"],
        d["band_95"],
        color="grey",
        alpha=0.3,
        label=f"mean along {d['n_random']} random directions (5-95 %)",
    )
    ax.set_xticks(range(n), [f"{c}" for c in d["conditions"]])
    ax.set_xlabel(
        "system prompt: strongly discourages the trait (sys0) ... strongly encourages it (sys7)"
    )
    ax.set_ylabel(f"projection on the {d['trait']} vector, layer {d['layer']}")
    ax.set_title(
        f"Monitoring before the reply: {len(d['grade']) // n} questions x {n} system prompts\n"
        f"Spearman rho of grade and projection {d['rho']:.2f}; random directions: 95 % of |rho| <= "
        f"{d['random_abs_rho_95']:.2f}",
        fontsize=10,
    )
    ax.legend(fontsize="small")


def finetuning_shift(d: dict, fig) -> None:
    """The finetuning shift at every layer for evil, normal and preventatively steered finetunes."""
    ax = fig.subplots()
    s, models = d["settings"], d["models"]
    layers = list(range(1, len(next(iter(models.values()))["shift"])))
    band = models["evil-s0"]["random_abs_95"]
    ax.fill_between(
        layers,
        [-band[L] for L in layers],
        [band[L] for L in layers],
        color="grey",
        alpha=0.3,
        label="random directions (95 % of |shift|)",
    )
    styles = {
        "evil-s0": ("tab:red", "-"),
        "evil-s1": ("tab:red", "--"),
        "normal": ("tab:blue", "-"),
        f"steer-L{s['layer']}": ("tab:green", "-"),
    }
    for name, (color, style) in styles.items():
        ax.plot(
            layers,
            [models[name]["shift"][L] for L in layers],
            color=color,
            linestyle=style,
            label=models[name]["label"],
        )
    ax.axvline(s["layer"], color="grey", linestyle=":", linewidth=1)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("layer (output of block L)")
    ax.set_ylabel(
        "finetuning shift along the evil vector\n(last prompt token, evaluation questions)"
    )
    ax.set_title(
        "Finetuned minus base model, along the evil vector at each layer\n"
        f"({s['n']} conversations, {s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']:g}; "
        "dotted: the steering layer)",
        fontsize=10,
    )
    ax.legend(fontsize="small")


def delta_p(d: dict, fig) -> None:
    """Histograms of every sample's ΔP (greedy base responses) in the trait data and in the normal
    data."""
    ax = fig.subplots()
    name = "greedy base"
    r = d["runs"][name]
    values = r["delta_p"]["trait"] + r["delta_p"]["normal"]
    bins = [min(values) + i * (max(values) - min(values)) / 24 for i in range(25)]
    ax.hist(
        r["delta_p"]["normal"],
        bins=bins,
        alpha=0.6,
        color="tab:blue",
        label=f"answers written under helpful prompts ({len(r['delta_p']['normal'])})",
    )
    ax.hist(
        r["delta_p"]["trait"],
        bins=bins,
        alpha=0.6,
        color="tab:red",
        label=f"answers written under {d['trait']} prompts ({len(r['delta_p']['trait'])})",
    )
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel(
        f"ΔP at layer {r['layer']}: training answer minus "
        "the model's own greedy answer, along the vector"
    )
    ax.set_ylabel("samples")
    ax.set_title(
        f"Flagging training data with the {d['trait']} vector: the two sets apart with AUROC "
        f"{r['auroc']:.2f}\n(the system prompts were removed before flagging, as in training data)",
        fontsize=10,
    )
    ax.legend(fontsize="small")


def capping(d: dict, fig) -> None:
    """Trait-expression reduction on trait-encouraging prompts against each cost, one point per arm:
    steering as a line (weakest to strongest), capping as points coloured by layer band, labelled by
    percentile."""
    axes = fig.subplots(1, 3, sharey=True)
    costs = [
        ("nll_increase", "extra nats/token on neutral text"),
        ("changed", "% of benign answers changed"),
        ("fired_benign", "% of benign answer tokens capped"),
    ]
    value = {
        "nll_increase": lambda r: r["nll_increase"],
        "changed": lambda r: 100 * (1 - r["unchanged"]),
        "fired_benign": lambda r: 100 * r["fired_benign"],
    }
    steer = [r for r in d["rows"] if r["kind"] in ("none", "steer")]
    bands = list(dict.fromkeys(r["band"] for r in d["rows"] if r["kind"] == "cap"))
    for ax, (key, label) in zip(axes, costs):
        if key != "fired_benign":  # steering has no ceiling to fire
            ax.plot(
                [value[key](r) for r in steer],
                [r["reduction"] for r in steer],
                color="black",
                marker="s",
                label="steering -c v (c = 0, "
                + ", ".join(f"{-r['coef']:g}" for r in steer[1:])
                + ")",
            )
        for band, color in zip(bands, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
            rs = [r for r in d["rows"] if r["kind"] == "cap" and r["band"] == band]
            ax.scatter(
                [value[key](r) for r in rs],
                [r["reduction"] for r in rs],
                color=color,
                label=f"cap at layers {band}",
            )
            for r in rs:
                ax.annotate(
                    f"p{r['percentile']:g}",
                    (value[key](r), r["reduction"]),
                    fontsize=7,
                    xytext=(3, 2),
                    textcoords="offset points",
                    color=color,
                )
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel(label, fontsize=9)
    axes[0].set_ylabel(
        f"drop in the answers' projection on {d['trait']}\n(sys5-7 prompts, layer {d['layer']}; "
        f"|v| = {d['vector_norm']:.1f})",
        fontsize=9,
    )
    axes[0].legend(fontsize=7)
    s = d["settings"]
    fig.suptitle(
        f"Capping vs steering on {d['model'].split('/')[-1]}: {s['questions']} "
        f"questions x {len(s['grades'])} graded system prompts, {s['benign']} "
        f"benign requests, greedy, {s['max_new_tokens']} tokens",
        fontsize=10,
    )


DRAW = {
    "steering": steering,
    "monitoring": monitoring,
    "finetuning_shift": finetuning_shift,
    "delta_p": delta_p,
    "capping": capping,
}
SIZES = {"steering": (9, 4.5), "capping": (11, 4.2)}


def draw(name: str, path: Path, d: dict) -> Path | None:
    """One picture from its numbers, written to path; None (and a note) when matplotlib is not
    installed."""
    plt = pyplot()
    if plt is None:
        print(
            f"matplotlib is not installed: {path} not drawn (pip install matplotlib)",
            file=sys.stderr,
        )
        return None
    fig = plt.figure(figsize=SIZES.get(name, (8, 4.5)))
    DRAW[name](d, fig)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"drew {path}", file=sys.stderr)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--collect", action="store_true", help="copy the numbers from the study runs first"
    )
    p.add_argument("--trait", default="evil")
    p.add_argument("--vectors", default=f"vectors/{MODEL}")
    p.add_argument("--sweep", default=f"vectors/{MODEL}/evil_sweep.csv")
    p.add_argument("--monitor", default=f"vectors/{MODEL}/evil_monitor_system.csv")
    p.add_argument("--train-study", default="out/train_study")
    p.add_argument("--flag-study", default="out/flag_study")
    a = p.parse_args(argv)
    if pyplot() is None:
        p.error("the pictures need matplotlib: pip install matplotlib")
    if a.collect:
        collect(a)
    for name in DRAW:
        draw(name, FIGURES / f"{name}.png", json.loads((FIGURES / f"{name}.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
