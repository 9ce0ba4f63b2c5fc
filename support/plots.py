"""The pipelines' pictures (optional: without matplotlib they are skipped), written atomically
beside the CSVs."""

from pathlib import Path

from support.files import atomic_write


def pyplot():
    """matplotlib.pyplot without a display, or None when matplotlib is not installed (plots are
    optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def plot_sweep(results: list[dict], trait: str, path: Path) -> Path | None:
    """Trait score against layer, one line per coefficient, coherence dashed (like the paper's
    Figure 3)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for coef in sorted({r["coef"] for r in results}):
        rs = [r for r in results if r["coef"] == coef]
        (line,) = ax.plot(
            [r["layer"] for r in rs],
            [r["trait_mean"] if r["trait_mean"] is not None else float("nan") for r in rs],
            marker="o",
            label=f"coef {coef}",
        )
        ax.plot(
            [r["layer"] for r in rs],
            [r["coherence_mean"] if r["coherence_mean"] is not None else float("nan") for r in rs],
            linestyle="--",
            color=line.get_color(),
            alpha=0.5,
        )
    ax.set_xticks(sorted({r["layer"] for r in results}))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{trait} score (solid), coherence (dashed)")
    return save_figure(plt, fig, ax, path)


def plot_monitor(rows: list[dict], trait: str, layer: int, path: Path) -> Path | None:
    """Projection before the reply against the judged score, one colour per condition (like the
    paper's Figure 4)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["condition"] for r in rows):
        rs = [r for r in rows if r["condition"] == label and r[trait] is not None]
        ax.scatter([r["projection"] for r in rs], [r[trait] for r in rs], s=12, label=label)
    ax.set_xlabel(f"projection of the last prompt token, layer {layer}")
    ax.set_ylabel(f"{trait} score")
    return save_figure(plt, fig, ax, path)
