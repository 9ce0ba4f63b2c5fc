"""Speed of `flag` (ΔP of every sample) against two transformers versions of the same computation, in one run.

    pip install transformers && python tools/bench_flag.py      # default model, fp32, 2 threads on the CPU

The same samples (prompt, response y: the model's own sampled answers to trait questions) and the same greedy
base responses y' (up to --new-tokens tokens) for all three:
(a) the official way: for each sample alone, transformers `generate` for y', then one `output_hidden_states`
    forward pass over prompt + y and one over prompt + y'. Target: ours >= 3x.
(b) batched transformers: batched `generate` for y', then batched hidden-state passes over prompt + y and
    prompt + y' (batches sorted by length, as ours). Target: ours >= 1.3x.
ours: flagging.score_chunk: one forward pass over prompt + y per batch, and y' captured while it is generated.
Targets are ratios measured in the same run, never absolute times.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules live at the repo root

import model as M
from support import flagging
from support import hub
from bench import left_pad  # tools/bench.py, beside this file
from support.traits import available_traits, load_trait


def make_samples(ours, tok, n: int, new_tokens: int) -> list[dict]:
    """n single-turn conversations: trait evaluation questions with the model's own sampled answers (untimed)."""
    questions = [q for t in available_traits() for q in load_trait(t).eval_questions][:n]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    answers = M.generate(ours, prompts, new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=0.7,
                         top_p=0.9, seed=1)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": tok.decode(a)}]}
            for q, a in zip(questions, answers)]


def until_stop(row: list[int], stop) -> list[int]:
    return next((row[:i] for i, x in enumerate(row) if x in stop), row)


def official(hf, tok, data, layer: int, unit: torch.Tensor, new_tokens: int) -> list[float]:
    """One sample at a time: generate y', then a hidden-state pass for y and one for y'."""
    out = []
    for prompt, y in data:
        with torch.no_grad():
            g = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
            y_base = until_stop(g, tok.stop_ids)
            means = []
            for r in (y, y_base):
                hs = hf(torch.tensor([prompt + r]), output_hidden_states=True).hidden_states
                means.append(hs[layer][0, len(prompt):].mean(0))
        out.append(float((means[0] - means[1]) @ unit) if y_base else float("nan"))
    return out


def batched(hf, tok, data, layer: int, unit: torch.Tensor, new_tokens: int, batch: int) -> list[float]:
    """Batched generate, then batched hidden-state passes over prompt + y and prompt + y' (left padding)."""
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]) + len(data[i][1]))
    out = [None] * len(data)
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        prompts = [data[i][0] for i in idx]
        with torch.no_grad():
            ids, mask = left_pad(prompts, tok.pad_id)
            g = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tok.pad_id)[:, ids.shape[1]:].tolist()
            bases = [until_stop(row, tok.stop_ids) for row in g]
            means = []
            for responses in ([data[i][1] for i in idx], bases):
                ids, mask = left_pad([p + r for p, r in zip(prompts, responses)], tok.pad_id)
                h = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
                resp = torch.zeros_like(mask)
                for j, r in enumerate(responses):
                    resp[j, ids.shape[1] - len(r):] = 1
                means.append((h * resp[..., None]).sum(1) / resp.sum(1, keepdim=True).clamp(min=1))
        for j, i in enumerate(idx):
            out[i] = float((means[0][j] - means[1][j]) @ unit) if bases[j] else float("nan")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="length limit of y (made once) and of y'")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved; the best time counts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM  # the reference; not a dependency of the project
    ours, tok = M.load(args.model, "cpu", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(hub.resolve(args.model, verbose=False), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = sorted(tok.stop_ids)  # stop where ours stops
    N, H = ours.config.num_hidden_layers, ours.config.hidden_size
    layer = N // 2
    vec = torch.randn(N + 1, H, generator=torch.Generator().manual_seed(0))
    probe = flagging.Probe("bench", Path("-"), layer, vec[layer] / vec[layer].norm(), vec, {}, "")
    convs = make_samples(ours, tok, args.samples, args.new_tokens)
    lines = [(json.dumps(c) + "\n").encode() for c in convs]
    data = [(tok.encode_chat(c["messages"][:-1]), tok.encode(c["messages"][-1]["content"])) for c in convs]
    s = flagging.Settings(args.model, None, 0.0, 1.0, 1, args.new_tokens, 4096, len(lines), 0)

    def run_ours():
        rows, _ = flagging.score_chunk(ours, tok, [probe], lines, 1, s, args.batch, 0)
        return [float("nan") if r["bench_delta_p"] is None else r["bench_delta_p"] for r in rows]

    runs = {"ours": run_ours,
            "batched": lambda: batched(hf, tok, data, layer, probe.unit, args.new_tokens, args.batch),
            "official": lambda: official(hf, tok, data, layer, probe.unit, args.new_tokens)}
    flagging.measure(ours, [data[0][0]], [data[0][1]], tok.stop_ids, tok.pad_id, 2)  # warm-up
    secs, got = {k: float("inf") for k in runs}, {}
    for _ in range(args.repeats):  # interleaved: a busy machine slows every side alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            got[name] = fn()
            secs[name] = min(secs[name], time.perf_counter() - t0)
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    diff = {k: max(abs(a - b) for a, b in zip(got["ours"], got[k]) if a == a and b == b)
            for k in ("batched", "official")}
    same_nan = {k: sum((a != a) == (b != b) for a, b in zip(got["ours"], got[k])) for k in ("batched", "official")}
    n = args.samples
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, fp32, {args.model}; {n} samples, y and y' up to "
          f"{args.new_tokens} tokens, batch {args.batch}, greedy y', best of {args.repeats}")
    print("| ΔP of every sample | samples/s | ours is | target | max abs ΔP difference to ours |\n"
          "|---|---|---|---|---|")
    print(f"| ours (flagging: one pass for y, y' captured while generated) | {n / secs['ours']:.2f} | | | |")
    for k, label, target in (("official", "(a) official way, one sample at a time", ">= 3x"),
                             ("batched", "(b) batched transformers", ">= 1.3x")):
        print(f"| {label} | {n / secs[k]:.2f} | {secs[k] / secs['ours']:.2f}x | {target} | {diff[k]:.1e} "
              f"({same_nan[k]}/{n} agree on having a y') |")


if __name__ == "__main__":
    main()
