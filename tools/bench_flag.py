"""Speed of `flag` (ΔP of every sample) against two transformers versions of the same computation,
in one run.

    pip install transformers && python tools/bench_flag.py  # default model, fp32, 2 CPU threads

The same samples (prompt, response y: the model's own sampled answers to trait questions) and the
same greedy base responses y' (up to --new-tokens tokens) for all three:
(a) the official way: y' from transformers `generate` in batches (the official code generates with
    vLLM), then for each sample alone one `output_hidden_states` forward pass over prompt + y and
    one over prompt + y'. Target: ours >= 3x. With --sequential also (a'), the same with generation
    one sample at a time too.
(b) batched transformers: batched `generate` for y', then batched hidden-state passes over prompt +
    y and prompt + y' (batches sorted by length, as ours). Target: ours >= 1.3x.
ours: flagging.score_chunk: one forward pass over prompt + y per batch, and y' captured while it is
generated. Targets are ratios measured in the same run, never absolute times.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# the project's modules live at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as M
import persona_vectors as pv
from apps import flagging
from support import checkpoint, hub
from support.traits import available_traits, load_trait


def make_samples(ours, tok, n: int, new_tokens: int) -> list[dict]:
    """n single-turn conversations: trait evaluation questions with the model's own sampled answers
    (untimed)."""
    questions = [q for t in available_traits() for q in load_trait(t).eval_questions][:n]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    answers = M.generate(
        ours,
        prompts,
        new_tokens,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        temperature=0.7,
        top_p=0.9,
        seed=1,
    )
    return [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": tok.decode(a)},
            ]
        }
        for q, a in zip(questions, answers)
    ]


def until_stop(row: list[int], stop) -> list[int]:
    return next((row[:i] for i, x in enumerate(row) if x in stop), row)


def generate_base(hf, tok, data, new_tokens: int, batch: int) -> list[list[int]]:
    """Greedy y' for every sample with transformers' batched `generate` (left padding), cut at the
    first stop."""
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]) + len(data[i][1]))
    out = [None] * len(data)
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        ids, mask = M.left_pad([data[i][0] for i in idx], tok.pad_id)
        with torch.no_grad():
            g = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_id,
            )[:, ids.shape[1] :].tolist()
        for i, row in zip(idx, g):
            out[i] = until_stop(row, tok.stop_ids)
    return out


def mean_one(hf, prompt: list[int], response: list[int], layer: int) -> torch.Tensor:
    """The official way to read a response: one forward pass with every hidden state, then the mean
    over y."""
    with torch.no_grad():
        hs = hf(torch.tensor([prompt + response]), output_hidden_states=True).hidden_states
    return hs[layer][0, len(prompt) :].mean(0)


def delta_p(a_y: torch.Tensor, a_base: torch.Tensor | None, unit: torch.Tensor) -> float:
    return float((a_y - a_base) @ unit) if a_base is not None else float("nan")


def official(
    hf, tok, data, layer: int, unit: torch.Tensor, new_tokens: int, batch: int
) -> list[float]:
    """Base responses generated in batches (the official code uses vLLM), then one hidden-state pass
    per sample for y and one for y'."""
    bases = generate_base(hf, tok, data, new_tokens, batch)
    return [
        delta_p(mean_one(hf, p, y, layer), mean_one(hf, p, yb, layer) if yb else None, unit)
        for (p, y), yb in zip(data, bases)
    ]


def sequential(hf, tok, data, layer: int, unit: torch.Tensor, new_tokens: int) -> list[float]:
    """Everything one sample at a time: generate y', then a hidden-state pass for y and one for
    y'."""
    out = []
    for p, y in data:
        yb = generate_base(hf, tok, [(p, y)], new_tokens, 1)[0]
        out.append(
            delta_p(mean_one(hf, p, y, layer), mean_one(hf, p, yb, layer) if yb else None, unit)
        )
    return out


def batched(
    hf, tok, data, layer: int, unit: torch.Tensor, new_tokens: int, batch: int
) -> list[float]:
    """Batched generate, then batched hidden-state passes over prompt + y and prompt + y' (left
    padding)."""
    bases = generate_base(hf, tok, data, new_tokens, batch)
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]) + len(data[i][1]))
    out = [None] * len(data)
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        prompts = [data[i][0] for i in idx]
        means = []
        for responses in ([data[i][1] for i in idx], [bases[i] for i in idx]):
            ids, mask = M.left_pad([p + r for p, r in zip(prompts, responses)], tok.pad_id)
            with torch.no_grad():
                h = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
                    layer
                ]
            resp = torch.zeros_like(mask)
            for j, r in enumerate(responses):
                resp[j, ids.shape[1] - len(r) :] = 1
            means.append((h * resp[..., None]).sum(1) / resp.sum(1, keepdim=True).clamp(min=1))
        for j, i in enumerate(idx):
            out[i] = delta_p(means[0][j], means[1][j] if bases[i] else None, unit)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument(
        "--new-tokens", type=int, default=64, help="length limit of y (made once) and of y'"
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of each, interleaved; the best time counts"
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="also time (a'): generation one sample at a time too",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM  # the reference; not a dependency of the project

    ours, tok = checkpoint.load(args.model, "cpu", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(
        hub.resolve(args.model, verbose=False), dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = sorted(tok.stop_ids)  # stop where ours stops
    N, H = ours.config.num_hidden_layers, ours.config.hidden_size
    layer = N // 2
    vec = torch.randn(N + 1, H, generator=torch.Generator().manual_seed(0))
    probe = flagging.Probe("bench", Path("-"), layer, vec[layer] / vec[layer].norm(), vec, {}, "")
    convs = make_samples(ours, tok, args.samples, args.new_tokens)
    lines = [(json.dumps(c) + "\n").encode() for c in convs]
    data = [
        (tok.encode_chat(c["messages"][:-1]), tok.encode(c["messages"][-1]["content"]))
        for c in convs
    ]
    s = flagging.Settings(args.model, None, 0.0, 1.0, 1, args.new_tokens, 4096, len(lines), 0)

    def run_ours():
        rows, _ = flagging.score_chunk(ours, tok, [probe], lines, 1, s, args.batch, 0)
        return [float("nan") if r["bench_delta_p"] is None else r["bench_delta_p"] for r in rows]

    runs = {
        "ours": run_ours,
        "batched": lambda: batched(hf, tok, data, layer, probe.unit, args.new_tokens, args.batch),
        "official": lambda: official(hf, tok, data, layer, probe.unit, args.new_tokens, args.batch),
    }
    if args.sequential:
        runs["sequential"] = lambda: sequential(hf, tok, data, layer, probe.unit, args.new_tokens)
    pv.response_and_base(ours, tok, [data[0][0]], [data[0][1]], 2)  # warm-up
    secs, got = {k: float("inf") for k in runs}, {}
    for _ in range(args.repeats):  # interleaved: a busy machine slows every side alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            got[name] = fn()
            secs[name] = min(secs[name], time.perf_counter() - t0)
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    diff = {
        k: max(abs(a - b) for a, b in zip(got["ours"], got[k]) if a == a and b == b)
        for k in runs
        if k != "ours"
    }
    same_nan = {
        k: sum((a != a) == (b != b) for a, b in zip(got["ours"], got[k]))
        for k in runs
        if k != "ours"
    }
    n = args.samples
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
        f"fp32, {args.model}; {n} samples, y and y' up to {args.new_tokens} tokens, "
        f"batch {args.batch}, greedy y', best of {args.repeats}"
    )
    print(
        "| ΔP of every sample | samples/s | ours is | target | max abs ΔP difference to ours |\n"
        "|---|---|---|---|---|"
    )
    print(
        "| ours (flagging: one pass for y, y' captured "
        f"while generated) | {n / secs['ours']:.2f} | | | |"
    )
    for k, label, target in (
        (
            "official",
            "(a) official way: batched generate, one hidden-state pass per sample for y and for y'",
            ">= 3x",
        ),
        ("sequential", "(a') the same with generation one sample at a time too", ""),
        (
            "batched",
            "(b) batched transformers: batched generate and hidden-state passes",
            ">= 1.3x",
        ),
    ):
        if k not in runs:
            continue
        print(
            f"| {label} | {n / secs[k]:.2f} | {secs[k] / secs['ours']:.2f}x | "
            f"{target} | {diff[k]:.1e} ({same_nan[k]}/{n} agree on having a y') |"
        )


if __name__ == "__main__":
    main()
