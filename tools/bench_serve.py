"""Throughput of `serve` with 16 concurrent clients against one-at-a-time serving, measured in one
run.

    python tools/bench_serve.py  # default model, fp32 on the CPU, 32 requests of 64 tokens

One server (in this process, on 127.0.0.1, a free port) answers the same requests twice: from one
client sending them one after another (each request is a batch of one; half before and half after
the other run, so that a change in the machine's load weighs on both) and from 16 clients at once
(dynamic batching). Requests are the evil and humorous traits' evaluation questions, greedy, a third
unsteered and the others steered along one of two random vectors, so the batches mix steerings and
every reply carries the persona gauge. Target: >= 4x the completion tokens per second. Greedy
replies must be the same in both runs.
"""

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

# the project's modules live at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as M
from apps import server
from support import checkpoint, hub
from support.files import save_vector
from support.traits import load_trait


def random_vectors(model: M.Transformer, out: Path) -> Path:
    """Two vector files of random directions (norm 4 at every index), like `extract`'s, for steering
    and gauges."""
    N, d = model.config.num_hidden_layers, model.config.hidden_size
    for seed, trait in enumerate(("evil", "humorous")):
        v = torch.randn(N + 1, d, generator=torch.Generator().manual_seed(seed))
        save_vector(
            out / f"{trait}_response_avg_diff.safetensors",
            4 * v / v.norm(dim=-1, keepdim=True),
            {"trait": trait, "model": "random", "residual_norm": [10.0] * (N + 1)},
        )
    return out


def bodies(n: int, max_tokens: int) -> list[dict]:
    questions = load_trait("evil").eval_questions + load_trait("humorous").eval_questions
    steers = [{}, {"evil": 1.0}, {"humorous": -1.0}]
    return [
        {
            "messages": [{"role": "user", "content": questions[i % len(questions)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "steer": steers[i % 3],
        }
        for i in range(n)
    ]


def run(url: str, reqs: list[dict], clients: int) -> tuple[float, list[str], int]:
    """Send every request from `clients` threads -> (seconds, reply texts, completion tokens)."""
    local = threading.local()

    def ask(body):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(f"{url}/chat/completions", json=body, timeout=3600)
        r.raise_for_status()
        j = r.json()
        return j["choices"][0]["message"]["content"], j["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(ask, reqs))
    return time.perf_counter() - t0, [o[0] for o in out], sum(o[1] for o in out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = checkpoint.load(args.model, "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        engine = server.Engine(
            model, tok, random_vectors(model, Path(tmp)), max_batch=args.clients, max_n=1
        )
        sizes, generate = [], engine.generate  # the size of every batch, as the worker starts it
        engine.generate = lambda rows: sizes.append(len(rows)) or generate(rows)
        srv = server.make_server(engine, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        reqs = bodies(args.requests, args.max_tokens)
        print(
            f"# {time.strftime('%Y-%m-%d')}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {args.threads} threads, fp32, {args.model}; "
            f"{args.requests} requests, max_tokens {args.max_tokens}, greedy, 2/3 steered",
            flush=True,
        )
        run(url, reqs[:1], 1)  # warm-up
        # one at a time: half the requests before the concurrent run and half after, so that a
        # change in the machine's load during the run weighs on both sides
        half = args.requests // 2
        print("one at a time (first half) ...", file=sys.stderr, flush=True)
        sa, texta, tokensa = run(url, reqs[:half], 1)
        print(f"{args.clients} clients ...", file=sys.stderr, flush=True)
        sizes.clear()
        s2, text2, tokens2 = run(url, reqs, args.clients)
        batch_sizes = list(sizes)
        print("one at a time (second half) ...", file=sys.stderr, flush=True)
        sb, textb, tokensb = run(url, reqs[half:], 1)
        s1, text1, tokens1 = sa + sb, texta + textb, tokensa + tokensb
        print("| serving | time | completion tokens/s | requests/s |\n|---|---|---|---|")
        print(
            f"| one client, one request at a time (two halves: {sa:.0f} s + {sb:.0f} "
            f"s) | {s1:.1f} s | {tokens1 / s1:.1f} | {args.requests / s1:.3f} |"
        )
        print(
            f"| {args.clients} concurrent clients | {s2:.1f} s "
            f"| {tokens2 / s2:.1f} | {args.requests / s2:.3f} |"
        )
        print(f"| throughput ratio (target >= 4x) | {(tokens2 / s2) / (tokens1 / s1):.2f}x | | |")
        print(f"| batch sizes in the concurrent run | {', '.join(map(str, batch_sizes))} | | |")
        print(
            "| identical greedy replies in both runs | "
            f"{sum(a == b for a, b in zip(text1, text2))}/{args.requests} "
            f"| {tokens1} vs {tokens2} tokens | |"
        )
        srv.shutdown()
        engine.close()


if __name__ == "__main__":
    main()
