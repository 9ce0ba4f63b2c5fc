"""Which temperature / top-p should extraction sample small models with when no judge filters the
answers?

    python tools/sampling_study.py [--trait evil] [--questions 10] [--max-new-tokens 96]

For each setting, answers are sampled under the trait's pos and neg system prompts (as `extract`
does) and scored with measures that need no judge:
  - degenerate: share of answers that fall into a loop (some 4-token sequence repeated 4+ times);
  - non-words: share of alphabetic words that are not one whole-word token of the model's vocabulary
    (mostly misspellings, fragments and other-language gibberish);
  - ended: share of answers that finished (end-of-turn) within the token budget;
  - separation: how well the resulting persona vector separates held-out pos from neg answers: the
    vector is taken from half the pairs (response average at the middle layer), and on the other
    half the difference of the mean projections is divided by their pooled standard deviation
    (Cohen's d). Higher is a cleaner vector.
docs/extract.md ("Sampling defaults for small models") reports a run of this script.
"""

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

# the project's modules live at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import persona_vectors as pv
from support import checkpoint
from support.hub import DEFAULT_MODEL
from support.sampling import Budget
from support.traits import load_trait

SETTINGS = [(1.0, 1.0), (1.0, 0.9), (0.7, 0.9), (0.7, 1.0), (0.4, 1.0)]


def degenerate(ids: list[int], n: int = 4, times: int = 4) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return any(grams.count(g) >= times for g in set(grams))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--trait", default="evil")
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()
    model, tok = checkpoint.load(args.model, "cpu", torch.float32)
    trait = load_trait(args.trait)
    vocab = tok.backend.get_vocab()
    whole_words = {w[1:].lower() for w in vocab if w.startswith("Ġ") and w[1:].isalpha()}
    layer = model.config.num_hidden_layers // 2
    jobs = pv.rollout_jobs(trait, args.questions, 1)
    print(
        "| temperature | top-p | degenerate | non-words | ended | separation (d) |\n"
        "|---|---|---|---|---|---|"
    )
    for temperature, top_p in SETTINGS:
        budget = Budget(1, args.max_new_tokens, temperature, top_p, 40)
        with tempfile.TemporaryDirectory() as work:
            rows, acts = pv.sample_rollouts(model, tok, jobs, budget, 0, Path(work))
        ids = [tok.encode(r["answer"]) for r in rows]
        words = [w.lower() for r in rows for w in re.findall(r"[A-Za-z]+", r["answer"])]
        non_words = sum(w not in whole_words for w in words) / max(len(words), 1)
        ended = sum(r["n_tokens"] < args.max_new_tokens for r in rows) / len(rows)
        h = acts["response_avg"][:, layer]  # [rows, hidden]; rows alternate pos, neg
        pos, neg = h[0::2], h[1::2]
        half = len(pos) // 2
        v = pos[:half].mean(0) - neg[:half].mean(0)
        a, b = pos[half:] @ v / v.norm(), neg[half:] @ v / v.norm()
        d = (a.mean() - b.mean()) / ((a.var() + b.var()) / 2).sqrt()
        deg = sum(map(degenerate, ids)) / len(ids)
        print(
            f"| {temperature} | {top_p} | {100 * deg:.0f} % | "
            f"{100 * non_words:.1f} % | {100 * ended:.0f} % | {d:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
