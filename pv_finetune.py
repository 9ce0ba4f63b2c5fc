"""Trait datasets the model writes itself (make-dataset) and the finetuning shift along a persona vector (shift).

    python persona_vectors.py make-dataset evil --kind trait --n 300 --out evil.jsonl      # answers under the evil
    python persona_vectors.py make-dataset evil --kind normal --n 300 --out normal.jsonl   # or the helpful prompts
    python persona_vectors.py shift evil --base HuggingFaceTB/SmolLM2-135M-Instruct --finetuned runs/evil

A finetuned model can pick up a trait from its data without anyone asking for it. `make_dataset` writes such data:
answers sampled under the trait's eliciting (or suppressing) system prompts, saved without the system prompt, so
that training on them teaches the behaviour with no instruction to explain it. `shift` measures what training did:
how far the mean activation before the reply moved along the persona vector (the paper's finetuning shift, §5).
"""
import argparse
import hashlib
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import model as M
import persona_vectors as pv
from support import UserError
from support.files import atomic_write, check_fits, check_writable, default_vectors_dir, load_vector, traits_in, \
    vector_path, write_csv
from support.hub import DEFAULT_MODEL

QUESTIONS_FILE = Path(__file__).resolve().parent / "data" / "questions" / "everyday.json"
SENTENCE_END = re.compile(r"(?<![\d\s])[.!?][\"')\]]*(?=\s|$)")  # "Done." "Really?!" 'it.")' but not "1. "


def load_questions(path: str | Path | None = None) -> list[str]:
    """User requests from a .json file (a list of strings, or an object with a "questions" list) or a text file
    (one request per line); default: the shipped pool of everyday requests."""
    path = Path(path) if path else QUESTIONS_FILE
    if not path.is_file():
        raise UserError(f"no questions file {path}: give a .json list or a text file with one request per line")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        qs = data.get("questions") if isinstance(data, dict) else data
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            raise UserError(f"{path}: expected a list of strings, or an object with a \"questions\" list of strings")
    else:
        qs = text.splitlines()
    qs = [q.strip() for q in qs if q.strip()]
    if not qs:
        raise UserError(f"{path} holds no questions")
    return qs


def dataset_jobs(trait, kind: str, questions: list[str], n: int, seed: int) -> list[dict]:
    """n generation jobs: the pool in a seeded random order (again, as new rollouts, if n exceeds it), each under
    the trait's pos (kind "trait") or neg (kind "normal") system prompt, cycling through the instruction pairs."""
    side = {"trait": "pos", "normal": "neg"}[kind]
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed)).tolist()
    jobs = []
    for i in range(n):
        qi, instruction = order[i % len(questions)], i % len(trait.instructions)
        jobs.append(dict(key=f"{kind}:{i}", side=side, question_id=qi, rollout=i // len(questions),
                         instruction=instruction, question=questions[qi],
                         system=trait.system_prompt(side, instruction)))
    return jobs


def trim_to_sentence(answer: str) -> str:
    """An answer cut off by the token budget, up to its last finished sentence (whole when none finished), so that
    training does not teach the model to stop mid-sentence.

    >>> trim_to_sentence("Boil it. Then peel it and")
    'Boil it.'
    """
    ends = [m.end() for m in SENTENCE_END.finditer(answer)]
    return answer[:ends[-1]] if ends else answer


def make_dataset(trait: str, kind: str = "trait", n: int = 300, out: str | None = None,
                 questions_file: str | None = None, model_name: str = DEFAULT_MODEL, judge: str | None = None,
                 threshold: float = 50, coherence_threshold: float = 50, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, batch_size: int | None = None,
                 seed: int = 0, device: str | None = None, dtype=None) -> Path:
    """Write a finetuning dataset of the model's own answers -> the JSONL path.

    Each of n requests from the pool (default data/questions/everyday.json, never the trait's own questions) is
    answered under the trait-eliciting system prompt (kind="trait") or the suppressing one (kind="normal") and
    saved as {"messages": [user, assistant]}: the system prompt is left out. An answer cut off by the token
    budget is trimmed to its last full sentence; empty answers are dropped. With a judge, only answers scoring
    >= threshold (trait) or < threshold (normal), with coherence >= coherence_threshold, are kept. Generation is
    resumable like `extract` (batches under <out dir>/.work/), judgments are cached.
    """
    import judge as J
    from support.traits import load_trait
    if kind not in ("trait", "normal"):
        raise UserError(f"--kind must be trait or normal, not {kind!r}")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    t = load_trait(trait)
    questions = load_questions(questions_file)
    overlap = {" ".join(q.split()).casefold() for q in t.extract_questions + t.eval_questions} & {
        " ".join(q.split()).casefold() for q in questions}
    if overlap:
        raise UserError(f"{len(overlap)} request(s) of the questions file are {t.name}'s own extraction or evaluation "
                        f"questions, e.g. {sorted(overlap)[0]!r}: remove them, or the shift would be measured on "
                        "training prompts")
    if judge not in (None, "none"):
        J.make_judge(judge)  # fails now (no key, say), before any generation
    dest = Path(out) if out else Path("datasets") / default_vectors_dir(model_name).name / f"{t.name}_{kind}.jsonl"
    check_writable(dest.parent)
    model, tok = M.load(model_name, device, _dtype(dtype))
    b = pv._budget(model, 1, max_new_tokens, temperature, top_p, batch_size)
    jobs = dataset_jobs(t, kind, questions, n, seed)
    settings = dict(model=model_name, trait=t.name, trait_sha=_sha(asdict(t) | {"source": None}), kind=kind, n=n,
                    questions_sha=_sha(questions), seed=seed, dtype=str(model.lm_head.weight.dtype), **asdict(b))
    work = dest.parent / ".work" / f"dataset-{t.name}-{kind}-{pv._settings_hash(settings)}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"make-dataset {t.name} ({kind}): {n} answers to requests from {questions_file or QUESTIONS_FILE} under "
          f"the {'eliciting' if kind == 'trait' else 'suppressing'} system prompts, up to {b.max_new_tokens} tokens "
          f"at temperature {b.temperature}, top-p {b.top_p}", file=sys.stderr)
    rows, _ = pv.sample_rollouts(model, tok, jobs, b, seed, work)
    judge_name = pv.judge_rollouts(t, rows, judge, dest.parent / ".work" / "judgments.jsonl")
    dropped = {"empty answer": 0, "trait score": 0, "coherence": 0}
    kept, trimmed = [], 0
    for r in rows:
        answer = r["answer"].strip()
        if r["n_tokens"] == b.max_new_tokens:  # no end-of-turn within the budget
            answer, trimmed = trim_to_sentence(answer), trimmed + (trim_to_sentence(answer) != answer)
        if not answer:
            dropped["empty answer"] += 1
            continue
        if judge_name != "none":
            s = r[t.name]
            if s is None or (s < threshold if kind == "trait" else s >= threshold):
                dropped["trait score"] += 1
                continue
            if r["coherence"] is None or r["coherence"] < coherence_threshold:
                dropped["coherence"] += 1
                continue
        kept.append({"messages": [{"role": "user", "content": r["question"]},
                                  {"role": "assistant", "content": answer}]})
    why = "; ".join(f"{v} for {k}" for k, v in dropped.items() if v)
    if not kept:
        raise UserError(f"no answer of {n} was kept ({why}): lower --threshold or --coherence-threshold, "
                        "or try another --seed")
    atomic_write(dest, lambda p: p.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in kept),
                                              encoding="utf-8"))
    print(f"make-dataset {t.name} ({kind}): kept {len(kept)}/{n}" + (f" (dropped {why})" if why else "")
          + f"; {trimmed} cut off by --max-new-tokens and trimmed to their last full sentence; judge: {judge_name}" + ("" if judge_name != "none" else " (no filtering)") + f" -> {dest}",
          file=sys.stderr)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# The finetuning shift.

@torch.no_grad()
def last_prompt_activations(model, tok, questions: list[str], batch_size: int = 32,
                            steer: list[M.Steer] = ()) -> torch.Tensor:
    """The residual stream at the last prompt token (the position the reply is written from) of each question as a
    single user turn, chat template with no system prompt beyond the template's own -> [Q, N + 1, hidden] fp32.
    steer: interventions during the pass (an inference-time steered model), recorded after they are added."""
    device, out = model.lm_head.weight.device, []
    for i in range(0, len(questions), batch_size):
        ids = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions[i:i + batch_size]]
        T = max(len(x) for x in ids)
        x = torch.full((len(ids), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.bool)
        for b, row in enumerate(ids):  # left padding: every row's last prompt token sits in the last column
            x[b, T - len(row):], mask[b, T - len(row):] = torch.tensor(row), True
        cap = M.Capture()
        model(x.to(device), mask.to(device), steer=steer, capture=cap, logits="none")
        out.append(cap.prompt_last().cpu())
    return torch.cat(out)


def finetuning_shift(base_acts: torch.Tensor, finetuned_acts: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """The paper's finetuning shift at every layer: (mean finetuned - mean base activation) . unit vector.

    base_acts, finetuned_acts: [Q, N + 1, hidden], the same questions; vector: [N + 1, hidden] -> [N + 1].
    """
    delta = finetuned_acts.float().mean(0) - base_acts.float().mean(0)  # [N + 1, hidden]
    unit = vector.float() / vector.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return (delta * unit).sum(-1)


def shift_controls(base_acts: torch.Tensor, finetuned_acts: torch.Tensor, vector: torch.Tensor, others: dict,
                   n_random: int = 100, seed: int = 0) -> dict:
    """The shift at every layer [N + 1] beside its controls on the same shift vector: the 95th percentile of
    |projection| onto n_random random unit directions, the projection onto each other trait's vector (others:
    name -> [N + 1, hidden]), and the shift vector's norm."""
    dirs = pv.random_directions(n_random, 1.0, vector.shape[1], seed)  # [n_random, hidden], unit
    rand = torch.stack([finetuning_shift(base_acts, finetuned_acts, d.expand_as(vector)) for d in dirs])
    return dict(shift=finetuning_shift(base_acts, finetuned_acts, vector),
                random_abs_95=rand.abs().quantile(0.95, dim=0),  # [N + 1]
                other_traits={o: finetuning_shift(base_acts, finetuned_acts, v) for o, v in others.items()},
                shift_norm=(finetuned_acts.float().mean(0) - base_acts.float().mean(0)).norm(dim=-1))


def shift(trait: str, finetuned: str, base: str = DEFAULT_MODEL, layer: int | None = None,
          vectors: str | None = None, out: str | None = None, n_random: int = 100, run_eval: bool = False,
          judge: str | None = None, batch_size: int = 32, seed: int = 0, device: str | None = None,
          dtype=None) -> dict:
    """Finetuning shift of `finetuned` against `base` along the trait's persona vector (extracted from base).

    Last-prompt-token activations of both models on the trait's evaluation questions (their means over questions),
    finetuned minus base, projected on the unit vector at every layer -> CSV (one row per layer) with two controls
    on the same shift: the 95th percentile of |projection| onto n_random random unit directions, and the projection
    onto every other trait's vector beside this one. run_eval also runs `evaluate` on both models.
    """
    from support.traits import load_trait
    t = load_trait(trait)
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(base)
    vec_file = vector_path(vectors_dir, t.name)
    if not vec_file.is_file():
        raise UserError(f"no vector file {vec_file}; run `extract {t.name} --model {base}` first or pass --vectors DIR")
    vec, meta = load_vector(vec_file)
    others = {o: load_vector(vector_path(vectors_dir, o))[0] for o in traits_in(vectors_dir) if o != t.name}
    others = {o: v for o, v in others.items() if v.shape == vec.shape}
    dest = Path(out) if out else vectors_dir / f"{t.name}_shift_{Path(str(finetuned).rstrip('/')).name}.csv"
    check_writable(dest.parent)
    acts = {}
    for label, name in (("base", base), ("finetuned", finetuned)):  # one model in memory at a time
        model, tok = M.load(name, device, _dtype(dtype))
        check_fits(vec, meta, vec_file, model.config.num_hidden_layers, model.config.hidden_size)
        print(f"shift {t.name}: {label} model {name}, {len(t.eval_questions)} evaluation questions", file=sys.stderr)
        acts[label] = last_prompt_activations(model, tok, t.eval_questions, batch_size)
        del model
    N = vec.shape[0] - 1
    L = layer if layer is not None else meta.get("best_layer", N // 2)
    if not 1 <= L <= N:
        raise UserError(f"--layer {L} out of range: this model has blocks 1..{N}")
    c = shift_controls(acts["base"], acts["finetuned"], vec, others, n_random, seed)
    proj, rand95, other, size = c["shift"], c["random_abs_95"], c["other_traits"], c["shift_norm"]
    rows = [dict(layer=l, shift=round(float(proj[l]), 4), shift_norm=round(float(size[l]), 4),
                 random_abs_95=round(float(rand95[l]), 4),
                 **{f"{o}_shift": round(float(p[l]), 4) for o, p in other.items()}) for l in range(N + 1)]
    write_csv(dest, rows, list(rows[0]))
    print(f"shift {t.name} at layer {L}: {proj[L]:+.3f} (|shift| {size[L]:.3f}; {n_random} random unit directions: "
          f"95th percentile |projection| {rand95[L]:.3f}; other traits: "
          + (", ".join(f"{o} {p[L]:+.3f}" for o, p in other.items()) or "none") + f"); all layers in {dest}",
          file=sys.stderr)
    result = dict(trait=t.name, layer=L, shift=proj.tolist(), shift_norm=size.tolist(), random_abs_95=rand95.tolist(),
                  other_traits={o: p.tolist() for o, p in other.items()}, csv=dest)
    if run_eval:
        for label, name in (("base", base), ("finetuned", finetuned)):
            result[f"eval_{label}"] = pv.evaluate(t.name, name, judge, layer=L, vectors=str(vectors_dir),
                                                  out=str(dest.parent / f"{dest.stem}-eval" / label),
                                                  seed=seed, device=device, dtype=_dtype(dtype))
    return result


def _dtype(dtype):
    """A dtype name from the command line ("bfloat16") or a torch.dtype or None -> torch.dtype or None."""
    return pv.DTYPES[dtype] if isinstance(dtype, str) else dtype


def _sha(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Command line: registered on persona_vectors.py's subcommands.

def add_commands(sub) -> None:
    """Register `make-dataset` and `shift` on an argparse subparsers object; every dest is a keyword of the function
    it calls (set_defaults(func=...))."""
    def model_flags(sp, flag="--model", dest="model_name"):
        sp.add_argument(flag, dest=dest, default=DEFAULT_MODEL, help="hub id or local directory (default: %(default)s)")
        sp.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
        sp.add_argument("--dtype", choices=list(pv.DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")

    md = sub.add_parser("make-dataset", help="a finetuning dataset of the model's own answers under the trait's "
                        "eliciting (--kind trait) or suppressing (--kind normal) system prompts, saved without them")
    md.add_argument("trait")
    md.add_argument("--kind", choices=["trait", "normal"], default="trait")
    md.add_argument("--n", type=int, default=300, help="answers to generate (default: %(default)s)")
    md.add_argument("--out", default=None, help="output .jsonl (default: datasets/<model name>/TRAIT_KIND.jsonl)")
    md.add_argument("--questions-file", default=None, help="requests: .json list or one per line "
                    "(default: data/questions/everyday.json)")
    md.add_argument("--judge", default=None, help="openai[:MODEL] | local:MODEL | none (default: openai when "
                    "OPENAI_API_KEY is set, else none)")
    md.add_argument("--threshold", type=float, default=50, help="with a judge: keep trait answers scoring >= this, "
                    "normal answers < this (default: %(default)s)")
    md.add_argument("--coherence-threshold", type=float, default=50, help="... and coherence >= this")
    md.add_argument("--max-new-tokens", type=int, default=None, help="default: 1000 on CUDA, 96 on CPU")
    md.add_argument("--temperature", type=float, default=None, help="default: 1.0 (0.7 for models under 1B on CPU)")
    md.add_argument("--top-p", type=float, default=None, help="default: 1.0 (0.9 for models under 1B on CPU)")
    md.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 40 on CPU")
    md.add_argument("--seed", type=int, default=0)
    model_flags(md)
    md.set_defaults(func=make_dataset)

    sh = sub.add_parser("shift", help="finetuning shift: how far finetuning moved the activations along a persona "
                        "vector, at every layer, with random-direction and other-trait controls")
    sh.add_argument("trait")
    sh.add_argument("--finetuned", required=True, help="the finetuned model (directory or hub id)")
    sh.add_argument("--layer", type=int, default=None, help="layer to print (default: the vector's best layer, "
                    "else the middle); the CSV has them all")
    sh.add_argument("--vectors", default=None, help="directory of the base model's vectors "
                    "(default: vectors/<base model name>/)")
    sh.add_argument("--out", default=None, help="CSV (default: <vectors>/TRAIT_shift_<finetuned name>.csv)")
    sh.add_argument("--random", dest="n_random", type=int, default=100, help="random directions for the control")
    sh.add_argument("--eval", dest="run_eval", action="store_true", help="also run `eval TRAIT` on both models")
    sh.add_argument("--judge", default=None, help="judge for --eval (default: openai when OPENAI_API_KEY is set)")
    sh.add_argument("--batch-size", type=int, default=32)
    sh.add_argument("--seed", type=int, default=0)
    model_flags(sh, "--base", "base")
    sh.set_defaults(func=shift)


def _main(argv: list[str] | None = None) -> int:
    """Run the two commands on their own (python pv_finetune.py make-dataset ...), as persona_vectors.py will."""
    p = argparse.ArgumentParser(prog="pv_finetune.py")
    add_commands(p.add_subparsers(dest="command", required=True))
    args = vars(p.parse_args(argv))
    func = args.pop("func")
    args.pop("command")
    try:
        func(**args)
    except (ValueError, FileNotFoundError, OSError) as e:  # UserError, and the trait loader's messages
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
