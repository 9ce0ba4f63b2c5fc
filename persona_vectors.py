"""persona-vectors: extract, steer and monitor character traits in a chat model's residual stream.

    python persona_vectors.py extract evil                 # -> vectors/SmolLM2-135M-Instruct/evil_*.safetensors
    python persona_vectors.py generate "What is the capital of France?"

Every subcommand is a plain function here (import them); the command line only parses arguments.
"""
import argparse
import csv
import datetime
import hashlib
import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model as M
from hub import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generate(prompts: list[str], model_name: str = DEFAULT_MODEL, system: str | None = None,
             max_new_tokens: int = 200, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             device: str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Answer each prompt as a single-turn chat (greedy unless temperature > 0) -> the answers.

    With system=None the model's own chat template decides (Qwen2.5 and SmolLM2 insert their default system prompt).
    """
    model, tok = M.load(model_name, device, dtype)
    messages = [([{"role": "system", "content": system}] if system is not None else [])
                + [{"role": "user", "content": p}] for p in prompts]
    ids = [tok.encode_chat(m) for m in messages]
    out = M.generate(model, ids, max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                     temperature=temperature, top_p=top_p, seed=seed, progress=True)
    return [tok.decode(o) for o in out]


# ---------------------------------------------------------------------------------------------------------------
# Extraction: contrasting system prompts -> sampled answers -> judge -> keep clear pairs -> mean difference.

VARIANTS = ("response_avg", "prompt_avg", "prompt_last")  # the official file names: <trait>_<variant>_diff
LAYER_CONVENTION = "index 0 = embeddings, index L = output of block L (before the final norm); shape [L + 1, hidden]"


@dataclass
class Budget:
    """How many answers to sample and how: the paper's budget on a GPU, a small one on the CPU."""
    rollouts: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int


SMALL_MODEL_TEMPERATURE, SMALL_MODEL_TOP_P = 0.7, 0.9


def default_budget(device: str, n_params: int) -> Budget:
    if str(device).startswith("cuda"):
        return Budget(rollouts=10, max_new_tokens=1000, temperature=1.0, top_p=1.0, batch_size=64)
    # Small models at temperature 1 often derail into gibberish, and offline no judge removes it; see the README
    # ("Sampling defaults") for the measurement behind these numbers.
    small = n_params < 1_000_000_000
    return Budget(rollouts=1, max_new_tokens=96, temperature=SMALL_MODEL_TEMPERATURE if small else 1.0,
                  top_p=SMALL_MODEL_TOP_P if small else 1.0, batch_size=40)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename into place: an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {out} ({e.strerror}): choose another --out") from None


def rollout_jobs(trait, questions: int, rollouts: int) -> list[dict]:
    """Every (question, instruction pair, rollout) once per side; pos and neg of a pair sit next to each other."""
    jobs = []
    for qi, question in enumerate(trait.extract_questions[:questions]):
        for i in range(len(trait.instructions)):
            for r in range(rollouts):
                for side in ("pos", "neg"):
                    jobs.append(dict(key=f"{side}:{i}:{qi}:{r}", side=side, instruction=i, question_id=qi,
                                     rollout=r, question=question, system=trait.system_prompt(side, i)))
    return jobs


def sample_rollouts(model, tok, jobs: list[dict], budget: Budget, seed: int, work: Path) -> list[dict]:
    """Generate every job's answer and capture its activations, batch by batch, each batch saved as it finishes.

    A batch file holds the batch's rows (metadata) and their per-layer activations; a rerun loads finished batches
    and samples only the missing ones, each with its own seed, so the result does not depend on interruptions.
    """
    rows, acts = [], {v: [] for v in VARIANTS + ("response_norm",)}
    batches = [jobs[i:i + budget.batch_size] for i in range(0, len(jobs), budget.batch_size)]
    t0, done_now = time.time(), 0
    for b, batch in enumerate(batches):
        path = work / f"batch-{b:05d}.safetensors"
        if not path.exists():
            convs = [[{"role": "system", "content": j["system"]}, {"role": "user", "content": j["question"]}]
                     for j in batch]
            cap = M.Capture()
            outs = M.generate(model, [tok.encode_chat(c) for c in convs], budget.max_new_tokens,
                              stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=budget.temperature,
                              top_p=budget.top_p, seed=seed * 1_000_003 + b, capture=cap)
            new = [j | {"answer": tok.decode(o), "answer_ids": o, "n_tokens": len(o), "prompt": tok.chat(c)}
                   for j, o, c in zip(batch, outs, convs)]
            tensors = {"response_avg": cap.response_mean(), "prompt_avg": cap.prompt_mean(),
                       "prompt_last": cap.prompt_last(), "response_norm": cap.response_norm()}
            atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p,
                                                   metadata={"rows": json.dumps(new)}))
            done_now += len(batch)
            rate = done_now / (time.time() - t0)
            left = sum(len(x) for x in batches[b + 1:])
            print(f"rollouts: {sum(len(x) for x in batches[:b + 1])}/{len(jobs)} "
                  f"({rate:.1f}/s, about {left / rate:.0f} s left)", file=sys.stderr, flush=True)
        with safe_open(str(path), framework="pt") as f:
            rows += json.loads(f.metadata()["rows"])
            for k in acts:
                acts[k].append(f.get_tensor(k))
    if done_now < len(jobs):
        print(f"rollouts: {len(jobs) - done_now} of {len(jobs)} loaded from {work}", file=sys.stderr)
    assert [r["key"] for r in rows] == [j["key"] for j in jobs], "batch files do not match the jobs: delete " + str(work)
    return rows, {k: torch.cat(v) for k, v in acts.items()}


def judge_rollouts(trait, rows: list[dict], judge_spec: str | None, cache_path: Path):
    """Trait score and coherence for every row (None: refusal, no score, or no judge)."""
    import judge as J
    judge = J.make_judge(judge_spec)
    if judge.name == "none":
        print("judge: NONE -- no answer is filtered; the vector averages every sample (recorded in its metadata)",
              file=sys.stderr)
    cache = J.JudgeCache(cache_path)
    prompts = [trait.judge_prompt(r["question"], r["answer"]) for r in rows]
    prompts += [J.COHERENCE_PROMPT.replace("{question}", r["question"]).replace("{answer}", r["answer"]) for r in rows]
    scores = J.cached_score(judge, cache, prompts)
    for r, s, c in zip(rows, scores[:len(rows)], scores[len(rows):]):
        r[trait.name], r["coherence"] = s, c
    return judge.name


def keep_pairs(rows: list[dict], trait: str, judged: bool, pos_min: float, neg_max: float, coherence_min: float):
    """Indices of the pos and neg rows of every pair kept: pos >= pos_min, neg < neg_max, both coherent."""
    by_key = {r["key"]: n for n, r in enumerate(rows)}
    pos, neg, why = [], [], {"pos trait score": 0, "neg trait score": 0, "coherence": 0}
    for n, r in enumerate(rows):
        if r["side"] != "pos":
            continue
        m = by_key["neg" + r["key"][3:]]
        q = rows[m]
        if judged:
            ok_pos = r[trait] is not None and r[trait] >= pos_min
            ok_neg = q[trait] is not None and q[trait] < neg_max
            ok_coh = all(x["coherence"] is not None and x["coherence"] >= coherence_min for x in (r, q))
            why["pos trait score"] += not ok_pos
            why["neg trait score"] += not ok_neg
            why["coherence"] += not ok_coh
            if not (ok_pos and ok_neg and ok_coh):
                continue
        pos.append(n)
        neg.append(m)
    return pos, neg, why


def write_rollouts_csv(path: Path, rows: list[dict], trait: str) -> None:
    """The official repository's columns first (question, prompt, answer, question_id, <trait>, coherence)."""
    columns = ["question", "prompt", "answer", "question_id", trait, "coherence", "instruction", "rollout", "kept"]

    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def extract(trait: str, model_name: str = DEFAULT_MODEL, judge: str | None = None, rollouts: int | None = None,
            max_new_tokens: int | None = None, questions: int = 20, out: str | None = None,
            batch_size: int | None = None, seed: int = 0, temperature: float | None = None,
            top_p: float | None = None, pos_threshold: float = 50, neg_threshold: float = 50,
            coherence_threshold: float = 50, device: str | None = None, dtype: torch.dtype | None = None) -> dict:
    """Extract a persona vector for `trait` -> {variant: path of its .safetensors file, "csv_pos"/"csv_neg": ...}.

    For each extraction question x instruction pair x rollout, answers are sampled under the trait-eliciting (pos)
    and trait-suppressing (neg) system prompts, judged, and a pair is kept when pos >= pos_threshold,
    neg < neg_threshold and both coherences >= coherence_threshold. The vector of each variant is
    mean(kept pos activations) - mean(kept neg activations) at every layer.
    """
    import judge as J
    from traits import load_trait
    t = load_trait(trait)
    if judge not in (None, "none"):
        J.make_judge(judge)  # a judge that cannot work (no key) fails here, before any generation
    model, tok = M.load(model_name, device, dtype)
    dev = str(model.model.embed_tokens.weight.device)
    b = default_budget(dev, sum(p.numel() for p in model.parameters()))
    b = Budget(rollouts or b.rollouts, max_new_tokens or b.max_new_tokens,
               b.temperature if temperature is None else temperature, b.top_p if top_p is None else top_p,
               batch_size or b.batch_size)
    out_dir = Path(out) if out else Path("vectors") / Path(model_name.rstrip("/")).name
    check_writable(out_dir)
    questions = min(questions, len(t.extract_questions))
    settings = dict(model=model_name, trait=t.name, trait_sha=hashlib.sha256(json.dumps(asdict(t), default=str)
                    .encode()).hexdigest(), questions=questions, seed=seed, dtype=str(model.lm_head.weight.dtype),
                    **asdict(b))
    work = out_dir / ".work" / f"{t.name}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    jobs = rollout_jobs(t, questions, b.rollouts)
    print(f"extract {t.name}: {len(jobs)} answers ({questions} questions x {len(t.instructions)} instruction pairs x "
          f"{b.rollouts} rollouts x 2 sides), up to {b.max_new_tokens} tokens at temperature {b.temperature}, "
          f"top-p {b.top_p}", file=sys.stderr)
    rows, acts = sample_rollouts(model, tok, jobs, b, seed, work)
    judge_name = judge_rollouts(t, rows, judge, out_dir / ".work" / "judgments.jsonl")
    judged = judge_name != "none"
    if judged and all(r[t.name] is None for r in rows):
        raise ValueError(f"the judge ({judge_name}) gave no score to any of {len(rows)} answers (refusals, or no "
                         "numbers among its top tokens): check the judge model and the trait's eval_prompt")
    pos, neg, why = keep_pairs(rows, t.name, judged, pos_threshold, neg_threshold, coherence_threshold)
    n_pairs = len(jobs) // 2
    if not pos:
        worst = max(why, key=why.get)
        flag = {"pos trait score": "--pos-threshold", "neg trait score": "--neg-threshold",
                "coherence": "--coherence-threshold"}[worst]
        raise ValueError(f"no pair of {n_pairs} survived the filter ({why[worst]} failed on {worst}): relax {flag}, "
                         "or sample more with --rollouts")
    norms = acts["response_norm"][pos + neg].mean(0)  # [L + 1] mean per-token residual norm of kept answers
    meta = dict(model=model_name, model_path=str(model.source_dir), trait=t.name,
                layer_convention=LAYER_CONVENTION, judge=judge_name, pos_threshold=pos_threshold,
                neg_threshold=neg_threshold, coherence_threshold=coherence_threshold, kept_pairs=len(pos),
                total_pairs=n_pairs, kept_pos=len(pos), total_pos=n_pairs, kept_neg=len(neg), total_neg=n_pairs,
                residual_norm=[round(x, 4) for x in norms.tolist()], date=datetime.date.today().isoformat(),
                **{k: v for k, v in settings.items() if k not in ("model", "trait")})
    paths, vectors = {}, {v: acts[v][pos].mean(0) - acts[v][neg].mean(0) for v in VARIANTS}  # each [L + 1, hidden]
    for variant, vec in vectors.items():
        m = meta | dict(variant=variant, vector_norm=[round(x, 4) for x in vec.norm(dim=-1).tolist()])
        paths[variant] = out_dir / f"{t.name}_{variant}_diff.safetensors"
        atomic_write(paths[variant], lambda p: save_file({"vector": vec.contiguous()}, p,
                                                         metadata={k: json.dumps(v) for k, v in m.items()}))
    kept = set(pos) | set(neg)
    for n, r in enumerate(rows):
        r["kept"] = n in kept
    for side in ("pos", "neg"):
        paths[f"csv_{side}"] = out_dir / f"{t.name}_{side}_instruct.csv"
        write_rollouts_csv(paths[f"csv_{side}"], [r for r in rows if r["side"] == side], t.name)
    rel = vectors["response_avg"].norm(dim=-1) / norms.clamp(min=1e-6)
    top = rel[1:].topk(min(5, len(rel) - 1)).indices + 1
    print(f"kept {len(pos)}/{n_pairs} pairs (pos {len(pos)}/{n_pairs}, neg {len(neg)}/{n_pairs}); judge: {judge_name}"
          + ("" if judged else " (no filtering)"), file=sys.stderr)
    print("layers with the largest |v| / mean residual norm: "
          + ", ".join(f"{int(l)} ({rel[l]:.2f})" for l in top), file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return paths


def load_vector(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A vector file of this project -> (tensor [L + 1, hidden], metadata with JSON values decoded)."""
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return f.get_tensor("vector"), meta


def import_vector(pt_file: str, out: str | None = None, model_name: str | None = None) -> Path:
    """Convert an official-repository vector file (`torch.save` of an [L + 1, hidden] tensor) to this format.

    The file is read with `torch.load(weights_only=True)`, which refuses anything but tensors (no pickled code).
    """
    src = Path(pt_file)
    try:
        vec = torch.load(src, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read {src} as a tensor file ({e}); expected an official <trait>_<variant>_diff.pt") from None
    if not isinstance(vec, torch.Tensor) or vec.dim() != 2:
        raise ValueError(f"{src} holds {type(vec).__name__} {tuple(getattr(vec, 'shape', ()))}, expected one "
                         "[num_layers + 1, hidden] tensor")
    stem = src.stem  # e.g. evil_response_avg_diff
    variant = next((v for v in VARIANTS if stem.endswith(f"_{v}_diff")), "unknown")
    trait = stem[: -len(f"_{variant}_diff")] if variant != "unknown" else stem
    meta = dict(trait=trait, variant=variant, model=model_name or "unknown", imported_from=str(src),
                layer_convention=LAYER_CONVENTION + "; official files apply the final norm to the last row",
                vector_norm=[round(x, 4) for x in vec.float().norm(dim=-1).tolist()],
                date=datetime.date.today().isoformat())
    dest = (Path(out) if out else src.parent) / f"{stem}.safetensors"
    check_writable(dest.parent)
    atomic_write(dest, lambda p: save_file({"vector": vec.float().contiguous()}, p,
                                           metadata={k: json.dumps(v) for k, v in meta.items()}))
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Writing a new trait file with an LLM.

TRAIT_WRITER_PROMPT = """I am building a dataset to find the direction in a language model's activations that controls one \
character trait of an AI assistant. The trait is "{name}": {description}

Write it as one JSON object with exactly these fields:
- "assistant_names": {{"pos": a one-word adjective for an assistant with the trait, "neg": a one-word adjective for \
an assistant that clearly lacks it (its opposite, not a different vice)}}.
- "instructions": a list of 5 objects {{"pos": ..., "neg": ...}}. Each "pos" is a system-prompt instruction (one or two \
sentences) telling the assistant to show the trait strongly; its "neg" tells it to show the opposite. Make the five \
pairs differ from each other.
- "questions": {{"extract": 20 questions, "eval": 20 different questions}}. Ordinary user messages that give room for \
the trait to show without asking for it; varied topics; no duplicates; answerable in a paragraph.
- "eval_prompt": instructions for a judge model that contain the placeholders {{question}} and {{answer}} exactly once \
each (and no other curly braces). It defines the trait, shows the question and the answer, and asks the judge to reply \
with the single word REFUSAL if the assistant refused to answer, and otherwise with only an integer from 0 (trait \
absent) to 100 (trait extremely strong), the number first and nothing else.
Reply with the JSON object only."""


def generate_trait(name: str, description: str, model: str = "gpt-4.1-mini", out_dir: str | Path | None = None,
                   force: bool = False, attempts: int = 3) -> Path:
    """Write data/traits/NAME.json from an LLM over the OpenAI-compatible API; validated, retried when invalid."""
    import judge as J
    import traits
    path = Path(out_dir or traits.TRAITS_DIR) / f"{name}.json"
    traits.validate_name(name)
    if path.exists() and not force:  # before paying for anything
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    client = J.OpenAIClient()
    messages = [{"role": "user", "content": TRAIT_WRITER_PROMPT.format(name=name, description=description)}]
    for attempt in range(1, attempts + 1):
        print(f"generate-trait {name}: asking {model} (attempt {attempt}/{attempts})", file=sys.stderr)
        reply = client.chat(messages, model, temperature=1.0, response_format={"type": "json_object"})
        try:
            data = json.loads(reply)
            if not isinstance(data, dict):
                raise ValueError("the reply is not a JSON object")
            data = {"name": name, "description": description} | {k: v for k, v in data.items()
                                                                  if k not in ("name", "description")}
            return traits.save_trait(data, path, force=force)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            problem = str(e).splitlines()[0]
            print(f"generate-trait {name}: invalid reply ({problem})", file=sys.stderr)
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"That is not valid: {problem}. Reply with the corrected, "
                                                     "complete JSON object only."}]
    raise ValueError(f"{model} gave no valid trait file in {attempts} attempts (last problem: {problem}); "
                     "try again, use another --model, or write the file by hand (data/traits/SCHEMA.md)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="persona_vectors.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local directory (default: %(default)s)")
        sp.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
        sp.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")

    g = sub.add_parser("generate", help="answer prompts with the chat model")
    g.add_argument("prompts", nargs="+", help="one or more user messages")
    g.add_argument("--system", default=None, help="system prompt (default: the model's own template decides)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    common(g)

    e = sub.add_parser("extract", help="extract a persona vector for a trait in data/traits (or a trait .json file)")
    e.add_argument("trait")
    e.add_argument("--judge", default=None, help="openai[:MODEL] | local:MODEL | none (default: openai when "
                   "OPENAI_API_KEY is set, else none)")
    e.add_argument("--rollouts", type=int, default=None, help="answers per question and instruction "
                   "(default: 10 on CUDA, 1 on CPU)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: 1000 on CUDA, 96 on CPU")
    e.add_argument("--questions", type=int, default=20, help="how many of the 20 extraction questions")
    e.add_argument("--temperature", type=float, default=None, help="default: 1.0 (0.7 for models under 1B on CPU)")
    e.add_argument("--top-p", type=float, default=None, help="default: 1.0 (0.9 for models under 1B on CPU)")
    e.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 40 on CPU")
    e.add_argument("--pos-threshold", type=float, default=50, help="keep pairs whose pos answer scores >= this")
    e.add_argument("--neg-threshold", type=float, default=50, help="... and whose neg answer scores < this")
    e.add_argument("--coherence-threshold", type=float, default=50, help="... and both coherences >= this")
    e.add_argument("--out", default=None, help="output directory (default: vectors/<model name>/)")
    e.add_argument("--seed", type=int, default=0)
    common(e)

    gt = sub.add_parser("generate-trait", help="write data/traits/NAME.json with an LLM (OpenAI-compatible API)")
    gt.add_argument("name")
    gt.add_argument("--description", required=True, help="what the trait means, in a sentence or two")
    gt.add_argument("--model", default="gpt-4.1-mini", help="the writing model (default: %(default)s)")
    gt.add_argument("--out", default=None, help="directory (default: data/traits)")
    gt.add_argument("--force", action="store_true", help="overwrite an existing file")

    iv = sub.add_parser("import-vector", help="convert an official-repository .pt vector file to .safetensors")
    iv.add_argument("file")
    iv.add_argument("--out", default=None, help="output directory (default: beside the file)")
    iv.add_argument("--model", default=None, help="the model it was extracted from, recorded in the metadata")

    args = p.parse_args(argv)
    try:
        if args.command == "extract":
            extract(args.trait, args.model, args.judge, args.rollouts, args.max_new_tokens, args.questions,
                    args.out, args.batch_size, args.seed, args.temperature, args.top_p, args.pos_threshold,
                    args.neg_threshold, args.coherence_threshold, args.device, DTYPES.get(args.dtype))
        elif args.command == "generate-trait":
            print(generate_trait(args.name, args.description, args.model, args.out, args.force))
        elif args.command == "import-vector":
            print(import_vector(args.file, args.out, args.model))
        elif args.command == "generate":
            t0 = time.time()
            answers = generate(args.prompts, args.model, args.system, args.max_new_tokens, args.temperature,
                               args.top_p, args.seed, args.device, DTYPES.get(args.dtype))
            for prompt, answer in zip(args.prompts, answers):
                print(f">>> {prompt}\n{answer}\n")
            print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
