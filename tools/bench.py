"""Speed of model.py against Hugging Face transformers on the same weights, measured side by side in
one run.

    pip install transformers && python tools/bench.py  # default model, fp32, 2 CPU threads

(a) steered batched generation (batch 16 and 32, 128 new tokens, greedy); reference: transformers
    `generate` with a forward hook adding the vector. Target >= 1.5x.
(b) response-average activations at every layer for 64 prompt+response pairs of ~200 tokens;
    reference: the official repository's way, one sample at a time with `output_hidden_states=True`.
    Target >= 3x, less memory.
(c) batch-1 decode as a fraction of the memory-bandwidth roofline: (weight bytes read per token /
    measured copy bandwidth) / measured time per token. Target >= 70 %.
(d) one full-finetuning step (forward, loss on the response tokens, backward, clip, AdamW) of
    train.py against transformers' model with `labels` and torch.optim.AdamW, same weights and
    batch. Target >= 1.0x tokens/s, and no more peak memory (the first step, which also allocates
    the gradients and AdamW's state).
(e) the CPU matmul split that support.checkpoint.load applies (support/cpu_speed.py) against plain
    nn.Linear, on the main job, extraction's sampling (40 answers of 96 tokens with capture, the CPU
    budget), and on batch-1 decoding (chat, serve, one prompt): the split stays only while it buys
    >= 15 % on one of them. `--only e --new-tokens 32` is a shorter check.
Targets are ratios measured in the same run, never absolute times.
"""

import argparse
import ctypes
import gc
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

# the project's modules live at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as M
import persona_vectors as pv
import train
from support import checkpoint, cpu_speed, hub
from support.sampling import default_budget


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms from /proc (MiB)."""

    def __enter__(self):
        gc.collect()
        # hand freed memory back, so an earlier run's pages are not reused
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.base) / 2**20


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "What should I do if my friend is sad?",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
]


def bench_generation(
    ours, hf, tok, batch: int, new_tokens: int, layer: int, vector: torch.Tensor, repeats: int = 3
) -> dict:
    prompts = [
        tok.encode_chat(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i // 8)}]
        )
        for i in range(batch)
    ]
    steer = [M.Steer(layer, vector, 4.0)]
    ids, mask = M.left_pad(prompts, tok.pad_id)
    mask = mask.long()  # transformers' attention masks are integers

    def hook(mod, inp, o):
        return (o[0] + 4.0 * vector,) + tuple(o[1:]) if isinstance(o, tuple) else o + 4.0 * vector

    def hf_steered():
        handle = hf.model.layers[layer - 1].register_forward_hook(hook)
        try:
            return hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_id,
            )
        finally:
            handle.remove()

    runs = {
        "plain_s": lambda: M.generate(ours, prompts, new_tokens, pad_id=tok.pad_id),
        "ours_s": lambda: M.generate(ours, prompts, new_tokens, pad_id=tok.pad_id, steer=steer),
        "hf_s": hf_steered,
    }
    M.generate(ours, prompts, 4, pad_id=tok.pad_id)  # warm-up
    best, outputs = {k: float("inf") for k in runs}, {}
    for _ in range(repeats):  # interleaved, best of each: a noisy machine slows every side alike
        for k, fn in runs.items():
            t, outputs[k] = timed(fn)
            best[k] = min(best[k], t)
    same = sum(
        o == r for o, r in zip(outputs["ours_s"], outputs["hf_s"][:, ids.shape[1] :].tolist())
    )
    return best | {"same_outputs": f"{same}/{batch}"}


def bench_capture(ours, hf, tok, pairs: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    data = []  # (prompt ids, response ids): ~60-token chat prompts with ~140-token responses
    for i in range(pairs):
        p = tok.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        r = torch.randint(100, 40000, (130 + i % 20,), generator=g).tolist()
        data.append((p, r))
    N = ours.config.num_hidden_layers

    def official():  # one sample at a time, all hidden states and all logits, then a mean per layer
        out = []
        for p, r in data:
            with torch.no_grad():
                hs = hf(torch.tensor([p + r]), output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0, len(p) :].mean(0) for h in hs]))
        return torch.stack(out)

    def batched():
        out = []
        for i in range(0, pairs, batch):
            chunk = data[i : i + batch]
            ids, mask = M.left_pad([p + r for p, r in chunk], tok.pad_id)
            start = torch.tensor([ids.shape[1] - len(r) for _, r in chunk])
            cap = M.Capture()
            with torch.no_grad():
                ours(ids, attention_mask=mask, answer_start=start, capture=cap, logits="none")
            out.append(cap.answer_mean())
        return torch.cat(out)

    with PeakRSS() as mem_ref:
        t_ref, ref = timed(official)
    with PeakRSS() as mem_ours:
        t_ours, got = timed(batched)
    diff = (got[:, :N] - ref[:, :N]).abs().max().item()  # HF's last entry is after the final norm
    return {
        "ours_s": t_ours,
        "hf_s": t_ref,
        "ours_mib": mem_ours.mib,
        "hf_mib": mem_ref.mib,
        "max_abs_diff": diff,
    }


def bandwidths() -> tuple[float, float]:
    """Bytes per second of a 256 MiB tensor copy (read + write counted, as STREAM does) and of a
    read-only sum."""
    src = torch.randn(64 * 2**20)  # far larger than any cache
    dst = torch.empty_like(src)
    t_copy, _ = timed(lambda: dst.copy_(src), repeats=5)
    t_sum, _ = timed(lambda: src.sum(), repeats=5)
    nbytes = src.numel() * src.element_size()
    return 2 * nbytes / t_copy, nbytes / t_sum


def bench_decode(ours, hf, tok, new_tokens: int) -> dict:
    # bytes read per token: every matrix once; the tied embedding once (as the LM head; the lookup
    # is one row)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bw, read_bw = bandwidths()
    prompt = tok.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    t_ours, _ = timed(lambda: M.generate(ours, [prompt], new_tokens), repeats=2)
    t_prefill, _ = timed(lambda: M.generate(ours, [prompt], 1), repeats=2)
    per_token = (t_ours - t_prefill) / (new_tokens - 1)
    ids = torch.tensor([prompt])
    t_hf, _ = timed(
        lambda: hf.generate(
            input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_id
        ),
        repeats=2,
    )
    t_hf1, _ = timed(
        lambda: hf.generate(
            input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_id
        ),
        repeats=2,
    )
    per_token_hf = (t_hf - t_hf1) / (new_tokens - 1)
    roofline = weight_bytes / bw
    return {
        "weight_mb": weight_bytes / 1e6,
        "bandwidth_gbs": bw / 1e9,
        "roofline_ms": roofline * 1e3,
        "read_gbs": read_bw / 1e9,
        "ours_frac_read": weight_bytes / read_bw / per_token,
        "ours_ms": per_token * 1e3,
        "hf_ms": per_token_hf * 1e3,
        "ours_frac": roofline / per_token,
        "hf_frac": roofline / per_token_hf,
    }


def split_vs_plain(ours, run, repeats: int) -> tuple[dict, dict]:
    """`run` timed with support/cpu_speed.py's split and with plain nn.Linear, interleaved, best of
    `repeats` each -> ({split_s, plain_s}, {split_s, plain_s: run's last output})."""
    best, outs = {"split_s": float("inf"), "plain_s": float("inf")}, {}
    try:
        for _ in range(repeats):
            for name, on in (("split_s", True), ("plain_s", False)):
                cpu_speed.split_linears(ours, on)
                t, outs[name] = timed(run)
                best[name] = min(best[name], t)
    finally:
        cpu_speed.split_linears(ours)  # as the loader left it
    return best, outs


def bench_extraction_split(ours, tok, new_tokens: int | None = None, repeats: int = 2) -> dict:
    """Extraction's sampling step as `extract` runs it on the CPU, with and without the split."""
    from support.traits import load_trait

    jobs = pv.rollout_jobs(load_trait("evil"), 4, 1)  # 4 questions x 5 pairs x 2 sides = 40 answers
    chats = [pv.conversation(j) for j in jobs]
    b = default_budget("cpu", sum(p.numel() for p in ours.parameters()))
    tokens = new_tokens or b.max_new_tokens

    def run():
        return pv.answer_with_activations(ours, tok, chats, tokens, b.temperature, b.top_p, 0)

    best, outs = split_vs_plain(ours, run, repeats)
    same = sum(a == b for a, b in zip(outs["split_s"][0], outs["plain_s"][0]))
    return best | {"answers": len(chats), "tokens": tokens, "same": f"{same}/{len(chats)}"}


def bench_decode_split(ours, tok, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Batch-1 greedy decoding of `new_tokens` (no stop), with and without the split."""
    ids = [tok.encode_chat([{"role": "user", "content": QUESTIONS[0]}])]

    def run():
        return M.generate(ours, ids, new_tokens, stop_ids=[], pad_id=tok.pad_id)

    best, outs = split_vs_plain(ours, run, repeats)
    return best | {"tokens": new_tokens, "same": outs["split_s"] == outs["plain_s"]}


def bench_train_step(ours, hf, tok, batch: int, seq: int, repeats: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.empty(batch, seq, dtype=torch.long)
    # the loss on the "response": all after the chat prompt
    trained = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        p = tok.encode_chat([{"role": "user", "content": QUESTIONS[b % len(QUESTIONS)]}])
        ids[b] = torch.tensor(p + torch.randint(100, 40000, (seq - len(p),), generator=g).tolist())
        trained[b, len(p) :] = True
    labels = ids.masked_fill(~trained, -100)  # transformers' convention: -100 carries no loss
    n = int(trained[:, 1:].sum())
    ours.train(), hf.train()
    opt_ours = train.make_optimizer(ours, 1e-5, 0.01)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.01)

    def ours_step():
        loss, _ = train.train_step(ours, opt_ours, [(ids, None, trained, 1 / n)], 1e-5)
        return float(loss) / n

    def hf_step():
        loss = hf(input_ids=ids, labels=labels).loss  # the mean over the response tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return float(loss.detach())

    with PeakRSS() as mem_ours:
        loss_ours = ours_step()
    with PeakRSS() as mem_hf:
        loss_hf = hf_step()
    best = {"ours": float("inf"), "hf": float("inf")}
    for _ in range(repeats):  # interleaved, best of each
        for k, fn in (("ours", ours_step), ("hf", hf_step)):
            best[k] = min(best[k], timed(fn)[0])
    return {
        "ours_s": best["ours"],
        "hf_s": best["hf"],
        "ours_mib": mem_ours.mib,
        "hf_mib": mem_hf.mib,
        "loss_ours": loss_ours,
        "loss_hf": loss_hf,
        "tokens": batch * seq,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="default: 128 in (a), the CPU budget's 96 in (e)",
    )
    p.add_argument("--only", choices=["a", "b", "c", "d", "e"], default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM  # the reference; not a dependency of the project

    ours, tok = checkpoint.load(args.model, "cpu", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(
        hub.resolve(args.model, verbose=False), dtype=torch.float32
    ).eval()
    # Both sides generate exactly the requested tokens: no stop token (min_new_tokens would instead
    # forbid EOS, changing transformers' greedy choices, so the outputs could not be compared).
    hf.generation_config.eos_token_id = None
    L = ours.config.num_hidden_layers
    vector = torch.randn(ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    print(
        f"# {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads, fp32, {args.model}"
    )
    print("| benchmark | ours | transformers | ratio | target |\n|---|---|---|---|---|")
    if args.only in (None, "a"):
        new = args.new_tokens or 128
        for batch in (16, 32):
            r = bench_generation(ours, hf, tok, batch, new, L // 2, vector)
            tps = lambda s: batch * new / s  # noqa: E731
            print(
                f"| (a) steered generation, batch {batch}, {new} new tokens "
                f"| {tps(r['ours_s']):.0f} tok/s | {tps(r['hf_s']):.0f} "
                f"tok/s | {r['hf_s'] / r['ours_s']:.2f}x | >= 1.5x |"
            )
            print(
                "|     steering overhead (steered vs unsteered, ours) | "
                f"{100 * (r['ours_s'] / r['plain_s'] - 1):+.1f} % | | | <= 5 % |"
            )
            print(f"|     identical greedy outputs | {r['same_outputs']} | | | |")
    if args.only in (None, "b"):
        r = bench_capture(ours, hf, tok, pairs=64, batch=4)
        print(
            "| (b) response-avg capture, 64 pairs, all layers | "
            f"{r['ours_s']:.1f} s, +{r['ours_mib']:.0f} MiB | {r['hf_s']:.1f} s, "
            f"+{r['hf_mib']:.0f} MiB | {r['hf_s'] / r['ours_s']:.2f}x | >= 3x |"
        )
        print(f"|     max abs difference of the means | {r['max_abs_diff']:.1e} | | | |")
    if args.only in (None, "c"):
        r = bench_decode(ours, hf, tok, 64)
        print(
            f"| (c) batch-1 decode vs roofline ({r['weight_mb']:.0f} MB / "
            f"{r['bandwidth_gbs']:.1f} GB/s = {r['roofline_ms']:.1f} ms) | {r['ours_ms']:.1f} "
            f"ms/token = {100 * r['ours_frac']:.0f} % | {r['hf_ms']:.1f} ms/token = "
            f"{100 * r['hf_frac']:.0f} % | {r['hf_ms'] / r['ours_ms']:.2f}x | >= 70 % |"
        )
        print(
            f"|     the same against read-only bandwidth ({r['read_gbs']:.1f} GB/s, a sum) | "
            f"{100 * r['ours_frac_read']:.0f} % | | | |"
        )
    if args.only in (None, "e"):
        r = bench_extraction_split(ours, tok, args.new_tokens)
        print(
            f"| (e) extraction sampling, {r['answers']} answers x {r['tokens']} tokens: "
            f"split vs plain nn.Linear | {r['split_s']:.1f} s | {r['plain_s']:.1f} s "
            f"(plain) | {r['plain_s'] / r['split_s']:.2f}x | >= 1.15x to keep it |"
        )
        print(f"|     identical answers | {r['same']} | | | |")
        r = bench_decode_split(ours, tok)
        print(
            f"| (e) batch-1 decoding, {r['tokens']} tokens: split vs plain nn.Linear | "
            f"{r['split_s']:.2f} s | {r['plain_s']:.2f} s (plain) | "
            f"{r['plain_s'] / r['split_s']:.2f}x | >= 1.15x to keep it |"
        )
        print(f"|     identical tokens | {r['same']} | | | |")
    if args.only in (None, "d"):  # last: it trains (changes) both models
        r = bench_train_step(ours, hf, tok, batch=4, seq=256)
        tps = lambda s: r["tokens"] / s  # noqa: E731
        print(
            "| (d) full-finetuning step, batch 4 x 256 tokens, AdamW | "
            f"{tps(r['ours_s']):.0f} tok/s, +{r['ours_mib']:.0f} MiB | {tps(r['hf_s']):.0f} "
            f"tok/s, +{r['hf_mib']:.0f} MiB | {r['hf_s'] / r['ours_s']:.2f}x, "
            f"{r['ours_mib'] / r['hf_mib']:.2f}x memory | >= 1.0x, <= 1.0x memory |"
        )
        print(f"|     first-step loss | {r['loss_ours']:.5f} | {r['loss_hf']:.5f} | | |")


if __name__ == "__main__":
    main()
