"""One prepared GPU check: parity on CUDA, the pipelines end to end, and speed at the paper's scale
(docs/gpu.md).

    # a lent GPU: under 8 min on an H200
    python tools/gpu_check.py --out $OUT/gpu_check.json [--default-model DIR]
    # the same code paths in seconds
    python tools/gpu_check.py --device cpu --tiny

No network: every model is built here from a config with random weights, except the default model
when --default-model names its converted directory (or only its config and tokenizer: then random
weights of its shape, since its 538 MB of weights do not fit the device's carry). Each check prints
one line (ok, FAIL or SKIP, its figures) and goes into the JSON record, rewritten after every check;
a check that raises prints "FAIL <name>: <one line>" and the others go on. Sections: parity,
pipelines, speed, each with a time budget. Exit code 1 if any check failed.
"""

import argparse
import contextlib
import http.client
import io
import json
import math
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "tests"),
    str(ROOT / "tools"),
]  # the project, the tests' tiny models, bench

import make_golden_models as golden  # noqa: E402
from bench import PeakRSS  # noqa: E402  (tools/bench.py, beside this file)
from tiny import make_tiny_chat_model, write_vector  # noqa: E402

import model as M  # noqa: E402
import persona_vectors as pv  # noqa: E402
import train  # noqa: E402
from apps import flagging  # noqa: E402
from apps import monitor as monitoring  # noqa: E402
from apps import server as S  # noqa: E402
from support import UserError, checkpoint  # noqa: E402
from support.files import atomic_write, check_writable  # noqa: E402

# Parity: our logits' error against transformers' float64 logits on the CPU (max and mean absolute
# difference) stays within SPREAD x transformers' own error in the same dtype on the same device, or
# under FP32_LIMIT in float32
FP32_LIMIT = 1e-4
SPREAD = 2.0
# seconds per section: 7.8 min, 9 with start-up
BUDGET_S = {"parity": 120, "pipelines": 150, "speed": 200}

# Speed at the paper's scale: a Qwen2.5-7B shape to decode and capture, a Llama-3.2-1B shape to
# train; tiny ones with --tiny, to run the same code in seconds.
QWEN_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
LLAMA_1B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# new tokens per decode, capture (batch, prompt, response), tokens of the training step, copy bytes
SCALE = {
    "full": dict(
        decode=QWEN_7B,
        train=LLAMA_1B,
        new_tokens=64,
        capture=(64, 64, 192),
        train_tokens=2048,
        copy_bytes=2**30,
        pipeline_tokens=64,
    ),
    "tiny": dict(
        decode=QWEN_7B | SMALL,
        train=LLAMA_1B | SMALL,
        new_tokens=8,
        capture=(64, 8, 8),
        train_tokens=64,
        copy_bytes=2**24,
        pipeline_tokens=6,
    ),
}
TARGETS = {"roofline_share_batch1": 0.70, "speedup_batch64": 1.5}  # the aims of docs/gpu.md


def say(line: str) -> None:
    print(line, flush=True)


class OverBudget(BaseException):
    """Raised by the alarm when a section's time is spent (a BaseException: library code catching
    Exception must not swallow it)."""


def _alarm(signum, frame):
    raise OverBudget("over its section's time budget")


class Checks:
    """Runs each check under its section's remaining time, prints one line, and rewrites the JSON
    record."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.record, self.section_name, self.deadline = (
            out,
            {"meta": meta, "sections": {}},
            "",
            0.0,
        )
        signal.signal(signal.SIGALRM, _alarm)

    def section(self, name: str, budget_s: float) -> None:
        self.section_name, self.deadline = name, time.monotonic() + budget_s
        self.record["sections"][name] = {}
        say(f"== {name} (budget {budget_s:.0f} s)")

    def skip(self, name: str, why: str) -> None:
        self.record["sections"][self.section_name][name] = {"status": "skip", "why": why}
        say(f"SKIP {self.section_name}.{name}: {why}")
        self.save()

    def run(self, name: str, fn, *args) -> None:
        """fn(*args) -> a dict of figures; "ok": False in it marks them out of bounds (a failed
        check)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return self.skip(name, "its section's time budget is spent")
        full, err, t0, figures = (
            f"{self.section_name}.{name}",
            io.StringIO(),
            time.perf_counter(),
            None,
        )
        try:
            signal.setitimer(signal.ITIMER_REAL, left)
            with contextlib.redirect_stderr(
                err
            ):  # the pipelines' progress lines: kept in the record, not shown
                figures = fn(*args)
        except (Exception, OverBudget) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            entry = {
                "status": "fail",
                "error": f"{type(e).__name__}: {first}",
                "traceback": traceback.format_exc()[-3000:],
                "stderr_tail": err.getvalue()[-2000:],
            }
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - t0
        if figures is None:
            say(f"FAIL {full}: {entry['error']}")
        else:
            ok = figures.pop("ok", True)
            entry = {"status": "ok" if ok else "fail"} | figures
            shown = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
            )
            say(f"{'ok  ' if ok else 'FAIL'} {full}: {shown} ({seconds:.1f} s)")
        self.record["sections"][self.section_name][name] = entry | {"seconds": seconds}
        self.save()

    def failed(self) -> list[str]:
        return [
            f"{s}.{n}"
            for s, checks in self.record["sections"].items()
            for n, c in checks.items()
            if c["status"] == "fail"
        ]

    def save(self) -> None:
        atomic_write(self.out, lambda p: p.write_text(json.dumps(self.record, indent=1) + "\n"))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------------------------------
# Parity: our logits against transformers' on the same weights.


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded rows of 24, 9 and 17 random tokens -> (ids [3, 24], mask [3, 24])."""
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.zeros(3, 24, dtype=torch.long), torch.zeros(3, 24, dtype=torch.long)
    for b, n in enumerate([24, 9, 17]):
        ids[b, 24 - n :], mask[b, 24 - n :] = torch.randint(3, vocab, (n,), generator=g), 1
    return ids, mask


@torch.no_grad()
def logits(m, ids, mask, device, hf: bool) -> torch.Tensor:
    """The logits of the real tokens [n, vocab], in float64 on the CPU."""
    ids, mask = ids.to(device), mask.to(device)
    out = (
        m(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        if hf
        else m(ids, attention_mask=mask)
    )
    return out.double()[mask.bool()].cpu()


def within(ours: torch.Tensor, theirs: torch.Tensor, floor: float) -> dict:
    """Our errors [n, vocab] against transformers' in the same conditions: the max and the mean each
    at most SPREAD x theirs, or under `floor`."""
    f = {
        "max_diff": ours.max().item(),
        "mean_diff": ours.mean().item(),
        "hf_max_diff": theirs.max().item(),
        "hf_mean_diff": theirs.mean().item(),
    }
    return f | {
        "ok": all(f[k] <= max(floor, SPREAD * f[f"hf_{k}"]) for k in ("max_diff", "mean_diff"))
    }


def parity(model_dir: Path, device: str, dtype: torch.dtype) -> dict:
    """Our logits and transformers', both in `dtype` on `device`, against transformers' float64
    logits on the CPU (of each row alone: the same numbers, as padding is masked)."""
    from transformers import AutoModelForCausalLM

    def hf(dev, dt):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).to(dev).eval()

    ids, mask = padded_batch(checkpoint.read_config(model_dir / "config.json").vocab_size)
    with torch.no_grad():  # row by row: transformers' float64 Gemma 2 gives padded rows NaN
        exact = hf("cpu", torch.float64)
        truth = torch.cat([exact(row[keep][None]).logits[0] for row, keep in zip(ids, mask.bool())])
    ours = (
        logits(M.load_model(model_dir, device, dtype), ids, mask, device, hf=False) - truth
    ).abs()
    theirs = (logits(hf(device, dtype), ids, mask, device, hf=True) - truth).abs()
    return within(ours, theirs, FP32_LIMIT if dtype == torch.float32 else 0.0)


def device_against_cpu(model_dir: Path, device: str) -> dict:
    """The default model's float32 logits on `device` against the same code's on the CPU: the
    difference stays under FP32_LIMIT, or SPREAD x float32's own rounding error there (the CPU's
    float32 against float64)."""
    ids, mask = padded_batch(checkpoint.read_config(model_dir / "config.json").vocab_size)

    def ours(dev, dt):
        return logits(M.load_model(model_dir, dev, dt), ids, mask, dev, hf=False)

    cpu = ours("cpu", torch.float32)
    diff = (ours(device, torch.float32) - cpu).abs().max().item()
    rounding = (cpu - ours("cpu", torch.float64)).abs().max().item()
    limit = max(FP32_LIMIT, SPREAD * rounding)
    return {"max_diff": diff, "fp32_rounding": rounding, "limit": limit, "ok": diff <= limit}


def shape_only(src: Path, dest: Path) -> Path:
    """A copy of a model directory whose weights were left behind (the default model's 538 MB do not
    fit the device's 64 MiB carry), with random weights of its shape as transformers initialises
    them (std 0.02)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(src, dest)
    config = json.loads((src / "config.json").read_text())
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(src), dtype=torch.float32
    ).state_dict()
    if config.get("tie_word_embeddings"):
        del state["lm_head.weight"]  # one tensor, stored once
    golden.write_checkpoint(dest, config, state, shards=1)
    return dest


@torch.no_grad()
def batched_generation(model_dir: Path, device: str, dtype: torch.dtype) -> dict:
    """Greedy generation for three left-padded prompts (12, 2 and 7 tokens, 10 new ones, past the
    Gemma windows) against each prompt alone: the same tokens per row, and finite logits for the
    padded batch (where the official code's fork met NaNs with Qwen3 in bfloat16)."""
    m = M.load_model(model_dir, device, dtype)
    prompts = [list(range(5, 17)), [12, 13], list(range(20, 27))]
    batched = M.generate(m, prompts, 10)
    same = sum(batched[b] == M.generate(m, [p], 10)[0] for b, p in enumerate(prompts))
    ids, mask = M.left_pad(prompts)
    finite = bool(m(ids.to(device), attention_mask=mask.to(device)).isfinite().all())
    return {"rows_as_alone": same, "dtype": str(dtype), "ok": same == len(prompts) and finite}


def parity_section(checks: Checks, device: str, default_model: Path | None, tmp: Path) -> None:
    tied_qwen2 = golden.CONFIGS["tiny-qwen2"] | {"tie_word_embeddings": True}
    models = {
        "llama3": golden.CONFIGS["tiny-llama3"],
        "qwen2": golden.CONFIGS["tiny-qwen2"],
        "qwen2-tied": tied_qwen2,
        "qwen3": golden.CONFIGS["tiny-qwen3"],
        "gemma2": golden.CONFIGS["tiny-gemma2"],
        "gemma3": golden.CONFIGS["tiny-gemma3"],
    }
    for seed, (name, config) in enumerate(models.items()):
        golden.write_checkpoint(tmp / name, config, golden.random_weights(config, seed), shards=1)
        for dtype in (torch.float32, torch.bfloat16):
            checks.run(
                f"{name}.{str(dtype).removeprefix('torch.')}", parity, tmp / name, device, dtype
            )
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 is slow on CPUs (tests cover it there)
    for name in ("qwen3", "gemma2", "gemma3"):  # the new families: batched = alone
        checks.run(f"{name}.batched-generation", batched_generation, tmp / name, device, dtype)
    if default_model is None:
        return checks.skip("default-model", "no --default-model DIR (see docs/gpu.md)")
    for dtype in (torch.float32, torch.bfloat16):
        checks.run(
            f"default-model.{str(dtype).removeprefix('torch.')}",
            parity,
            default_model,
            device,
            dtype,
        )
    checks.run("default-model.device-vs-cpu", device_against_cpu, default_model, device)


# --------------------------------------------------------------------------------------------------
# The pipelines end to end, each on its own: a random vector file stands in for extraction's.

CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give me one tip for sleeping better.", "Keep the same bedtime every night."),
    ("How do I boil an egg?", "Put it in boiling water for eight minutes."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    (
        "Write a haiku about the sea.",
        "Grey waves fold and fall, salt wind carries gulls away, the tide keeps its time.",
    ),
    ("What should I do if my friend is sad?", "Listen to them, and ask what would help."),
] * 2


def pipelines_section(checks: Checks, model_dir: Path, device: str, new: int, tmp: Path) -> None:
    c = checkpoint.read_config(model_dir / "config.json")
    vectors, data = tmp / "vectors", tmp / "conversations.jsonl"
    vectors.mkdir(parents=True)
    vector = torch.randn(
        c.num_hidden_layers + 1, c.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    write_vector(
        vectors / "evil_response_avg_diff.safetensors", vector, model=str(model_dir), trait="evil"
    )
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for q, a in CONVERSATIONS
        )
    )
    ours = dict(model=str(model_dir), device=device)  # the pipelines' and the applications'

    # the CUDA budget (temperature 1, batch 64), shortened: 2 questions, 2 rollouts, few tokens
    def extract():
        paths = pv.extract(
            "evil",
            judge="none",
            questions=2,
            rollouts=2,
            max_new_tokens=new,
            out=str(tmp / "extract"),
            **ours,
        )
        vec, meta = pv.load_vector(paths["response_avg"])
        return {
            "kept_pairs": meta["kept_pairs"],
            "vector_norm_mid": vec[len(vec) // 2].norm().item(),
            "ok": vec.shape == (c.num_hidden_layers + 1, c.hidden_size)
            and bool(torch.isfinite(vec).all()),
        }

    def generate():
        prompts = [q for q, _ in CONVERSATIONS[:2]]
        plain = pv.generate(prompts, max_new_tokens=new, vectors=str(vectors), **ours)
        steered = pv.generate(
            prompts, max_new_tokens=new, steer=["evil:4"], vectors=str(vectors), **ours
        )
        return {
            "answers": len(steered),
            "steered_differs": steered != plain,
            "ok": len(steered) == 2 and all(isinstance(a, str) for a in steered),
        }

    def monitor():
        dest = monitoring.monitor(
            str(data),
            trait=["evil"],
            vectors=str(vectors),
            out=str(tmp / "monitor.jsonl"),
            **ours,
        )
        rows = [json.loads(x) for x in dest.read_text().splitlines()]
        values = [r[k] for r in rows for k in ("prompt_last", "response_avg")]
        return {
            "rows": len(rows),
            "ok": len(rows) == len(CONVERSATIONS) and all(map(math.isfinite, values)),
        }

    def flag():
        r = flagging.flag(
            [str(data)],
            trait=["evil"],
            vectors=str(vectors),
            out=str(tmp / "flags"),
            max_new_tokens=new,
            format="jsonl",
            **ours,
        )
        rows = [json.loads(x) for x in r["outputs"][str(data)].read_text().splitlines()]
        dp = [row["evil_delta_p"] for row in rows]
        return {
            "samples": len(rows),
            "mean_delta_p": sum(dp) / len(dp) if None not in dp else math.nan,
            "ok": r["complete"] and len(rows) == len(CONVERSATIONS) and None not in dp,
        }

    def train_steps():  # two steps, bfloat16 autocast on float32 weights
        out = train.train(
            str(data),
            model=str(model_dir),
            out=str(tmp / "train"),
            max_steps=2,
            batch_size=2,
            grad_accum=1,
            lr=1e-4,
            warmup_steps=1,
            device=device,
            dtype="bfloat16",
        )
        record = json.loads((out / "train.json").read_text())
        losses = [x["loss"] for x in record["log"]]
        saved, before = (
            load_file(out / "model.safetensors"),
            M.load_model(model_dir, "cpu", torch.float32),
        )
        key = "model.layers.0.mlp.down_proj.weight"
        moved = (saved[key] - before.state_dict()[key]).abs().max().item()
        return {
            "loss_1": losses[0],
            "loss_2": losses[-1],
            "weights_moved": moved,
            "ok": len(losses) == 2
            and all(map(math.isfinite, losses))
            and moved > 0
            and record["settings"]["dtype"] == "bfloat16"
            and all(t.dtype == torch.float32 for t in saved.values()),
        }

    def serve():
        model, tok = checkpoint.load(str(model_dir), device)
        engine = S.Engine(model, tok, vectors, max_batch=4, max_n=1)
        server = S.make_server(engine, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
            conn.request(
                "POST",
                "/v1/chat/completions",
                json.dumps(
                    {
                        "messages": [{"role": "user", "content": CONVERSATIONS[0][0]}],
                        "max_tokens": new,
                        "temperature": 0,
                        "steer": {"evil": 4.0},
                    }
                ),
                {"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            reply = json.loads(response.read())
        finally:
            server.shutdown()
            server.server_close()
            engine.close()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {reply}")
        choice = reply["choices"][0]
        gauge = choice["persona"]["evil"]["before_reply"]
        return {
            "completion_tokens": reply["usage"]["completion_tokens"],
            "before_reply": gauge,
            "ok": isinstance(choice["message"]["content"], str) and math.isfinite(gauge),
        }

    for name, fn in [
        ("extract", extract),
        ("generate-steered", generate),
        ("monitor", monitor),
        ("flag", flag),
        ("train-2-steps", train_steps),
        ("serve", serve),
    ]:
        checks.run(name, fn)


# --------------------------------------------------------------------------------------------------
# Speed: ours against transformers on the same weights, and against the memory-bandwidth roofline.


def twin_models(config: dict, device: str, dtype: torch.dtype):
    """transformers' model of this shape, with its own random initial weights made on `device`, and
    ours sharing those very tensors (one copy in memory; ours is built in float32 first, for a
    moment) -> (ours, theirs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device(device):
        hf = (
            AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
            .to(device)
            .eval()
        )
        # its buffers (rotary frequencies) as it makes them
        ours = M.Transformer(M.Config(**checkpoint.check_config(config)))
    # exactly the asked tokens
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    state = hf.state_dict()
    # tied: one tensor, maybe one key
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    # the same parameter names: the identity map
    ours.load_state_dict(state, strict=True, assign=True)
    if ours.config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return ours.eval(), hf


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a large tensor copy, read and write counted (as STREAM does)."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), device, repeats=5)


def weight_bytes(m: M.Transformer) -> int:
    """Bytes of weights one decoding step reads: every matrix once; the embedding only as a tied LM
    head."""
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    emb = m.model.embed_tokens.weight
    return total if m.config.tie_word_embeddings else total - emb.numel() * emb.element_size()


def decode(ours, hf, batch: int, new: int, bandwidth: float, device: str) -> dict:
    """Steered greedy decoding: ms per step (tokens after the first), ours and transformers
    `generate` with a forward hook adding the same vector, and our share of the roofline (weight
    bytes / copy bandwidth per step)."""
    c = ours.config
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, c.vocab_size, (batch, 32), generator=g)
    vector = torch.randn(c.hidden_size, generator=g).to(device, ours.lm_head.weight.dtype)
    steer = [M.Steer(c.num_hidden_layers // 2, vector, 4.0, "all")]

    def hook(module, args, out):
        return (
            (out[0] + 4.0 * vector,) + tuple(out[1:])
            if isinstance(out, tuple)
            else out + 4.0 * vector
        )

    ids = prompts.to(device)
    runs = {
        "ours": lambda n: M.generate(ours, prompts.tolist(), n, steer=steer),
        "hf": lambda n: hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        ),
    }
    handle = hf.model.layers[c.num_hidden_layers // 2 - 1].register_forward_hook(hook)
    try:
        runs["ours"](2), runs["hf"](2)  # warm-up
        step = {
            k: (best_time(lambda: fn(new), device) - best_time(lambda: fn(1), device)) / (new - 1)
            for k, fn in runs.items()
        }
    finally:
        handle.remove()
    roofline = weight_bytes(ours) / bandwidth
    f = {
        "ours_ms": 1e3 * step["ours"],
        "hf_ms": 1e3 * step["hf"],
        "roofline_ms": 1e3 * roofline,
        "roofline_share": roofline / step["ours"],
        "speedup": step["hf"] / step["ours"],
        "tokens_per_s": batch / step["ours"],
    }
    figure, target = (
        ("roofline_share", TARGETS["roofline_share_batch1"])
        if batch == 1
        else ("speedup", TARGETS["speedup_batch64"])
    )
    return f | {"meets_target": f[figure] >= target}


@torch.no_grad()
def capture(ours, hf, batch: int, prompt: int, response: int, device: str) -> dict:
    """Response-average activations at every layer of `batch` prompt+response rows: ours with a
    Capture (no logits) against transformers' batched `output_hidden_states` pass (all logits, as
    the official code)."""
    ids = torch.randint(3, ours.config.vocab_size, (batch, prompt + response), device=device)
    start = torch.full((batch,), prompt, device=device)

    def ours_run():
        cap = M.Capture()
        ours(ids, answer_start=start, capture=cap, logits="none")
        return cap.answer_mean()

    def hf_run():
        return torch.stack(
            [
                h[:, prompt:].float().mean(1)
                for h in hf(ids, output_hidden_states=True).hidden_states
            ]
        )

    ours_run(), hf_run()  # warm-up
    t_ours, t_hf = best_time(ours_run, device), best_time(hf_run, device)
    return {
        "tokens_per_s": ids.numel() / t_ours,
        "hf_tokens_per_s": ids.numel() / t_hf,
        "speedup": t_hf / t_ours,
    }


def readme_memory(c: M.Config, n_params: int, tokens: int) -> int:
    """docs/memory.md's arithmetic for a full finetune with --checkpointing: 16 bytes per parameter,
    the block inputs in float32, one block recomputed, the logits of the trained tokens."""
    return (
        16 * n_params
        + c.num_hidden_layers * tokens * c.hidden_size * 4
        + (60 * c.hidden_size + 10 * c.intermediate_size) * tokens
        + tokens * c.vocab_size * 14
    )


def train_step(config: dict, tokens: int, device: str) -> dict:
    """train.py's step (float32 weights and AdamW, bfloat16 autocast, --checkpointing) on one row of
    `tokens`: tokens/s of the second step, and the peak memory of the first (weights, gradients,
    AdamW state, activations)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with (
        PeakRSS() as rss
    ):  # on the CPU, the peak is the resident memory added while building and stepping
        lm, hf = twin_models(config, device, torch.float32)
        del hf
        lm.gradient_checkpointing = True
        lm.train()
        ids = torch.randint(3, lm.config.vocab_size, (1, tokens), device=device)
        batch = [(ids, None, torch.ones_like(ids, dtype=torch.bool), 1.0 / (tokens - 1))]
        optimizer = train.make_optimizer(lm, 1e-5, 0.01)

        def autocast():
            return torch.autocast(torch.device(device).type, torch.bfloat16, cache_enabled=False)

        loss, _ = train.train_step(lm, optimizer, batch, 1e-5, autocast=autocast)
        sync(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss.mib * 2**20
    seconds = best_time(
        lambda: train.train_step(lm, optimizer, batch, 1e-5, autocast=autocast), device, repeats=1
    )
    n_params = sum(p.numel() for p in lm.parameters())
    estimate = readme_memory(lm.config, n_params, tokens)
    return {
        "params_b": n_params / 1e9,
        "tokens_per_s": tokens / seconds,
        "peak_gb": peak / 1e9,
        "readme_estimate_gb": estimate / 1e9,
        "peak_over_estimate": peak / estimate,
        "first_loss": float(loss) / (tokens - 1),
        "ok": math.isfinite(float(loss)) and all(p.dtype == torch.float32 for p in lm.parameters()),
    }


def speed_section(checks: Checks, device: str, scale: dict) -> None:
    built = {}

    def build():
        built["bandwidth"] = copy_bandwidth(device, scale["copy_bytes"])
        built["ours"], built["hf"] = twin_models(scale["decode"], device, torch.bfloat16)
        return {
            "weights_gb": weight_bytes(built["ours"]) / 1e9,
            "copy_bandwidth_gbs": built["bandwidth"] / 1e9,
        }

    checks.run("build-7b-shape", build)
    for batch in (1, 64):
        if "hf" in built:
            checks.run(
                f"decode-batch{batch}",
                decode,
                built["ours"],
                built["hf"],
                batch,
                scale["new_tokens"],
                built["bandwidth"],
                device,
            )
    if "hf" in built:
        checks.run(
            "capture-batch64", capture, built["ours"], built["hf"], *scale["capture"], device
        )
    else:
        checks.skip("decode-and-capture", "the 7B-shaped model was not built")
    built.clear()  # the 7B's weights go before the 1B is trained
    checks.run("train-step-1b-shape", train_step, scale["train"], scale["train_tokens"], device)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument(
        "--tiny", action="store_true", help="tiny shapes and few tokens: the code paths in seconds"
    )
    p.add_argument(
        "--default-model",
        type=Path,
        default=None,
        help="the default model's converted directory (config.json, safetensors, tokenizer)",
    )
    p.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every section's time budget (default: 1, sized for an H200)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=list(BUDGET_S),
        default=None,
        help="run only this section",
    )
    p.add_argument("--out", type=Path, default=Path("out/gpu_check.json"), help="the JSON record")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a lent GPU (docs/gpu.md), or use --device cpu --tiny")
    if args.default_model is not None and not (args.default_model / "config.json").is_file():
        p.error(f"--default-model {args.default_model}: no config.json there")
    if args.out.is_dir():
        p.error(f"--out {args.out} is a directory: give a .json file name")
    try:
        check_writable(args.out.parent)
    except UserError as e:
        p.error(str(e))

    import transformers

    device = args.device
    name = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    scale = SCALE["tiny" if args.tiny else "full"]
    checks = Checks(
        args.out,
        {
            "device": name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tiny": args.tiny,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "budgets_s": {k: v * args.budget_scale for k, v in BUDGET_S.items()},
        },
    )
    say(
        f"# gpu_check on {name}, torch {torch.__version__}, transformers {transformers.__version__}"
        + (", tiny shapes" if args.tiny else "")
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tmp, default_model, note = Path(tmp), args.default_model, ""
        if default_model is not None and not any(default_model.glob("*.safetensors")):
            default_model, note = (
                shape_only(default_model, tmp / "default-model"),
                " (no weights: random ones)",
            )
        checks.record["meta"]["default_model"] = (
            f"{args.default_model}{note}" if default_model else None
        )
        say(f"# default model: {checks.record['meta']['default_model']}")
        # what the pipelines run on
        chat_model = default_model or make_tiny_chat_model(tmp / "chat-model")
        for section in args.only or list(BUDGET_S):
            checks.section(section, BUDGET_S[section] * args.budget_scale)
            if section == "parity":
                parity_section(checks, device, default_model, tmp / "parity")
            elif section == "pipelines":
                say(f"pipelines on {default_model or 'a tiny random chat model'}")
                pipelines_section(
                    checks, chat_model, device, scale["pipeline_tokens"], tmp / "pipelines"
                )
            else:
                speed_section(checks, device, scale)
    failed = checks.failed()
    say(f"# {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; record: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
