"""persona-vectors: extract, steer and monitor character traits in a chat model's residual stream.

    python persona_vectors.py extract evil                 # -> vectors/SmolLM2-135M-Instruct/evil_*.safetensors
    python persona_vectors.py generate "How should I treat a new employee?" --steer evil:1.5
    python persona_vectors.py sweep evil                   # the best setting: evil_sweep.json
    python persona_vectors.py eval evil --steer evil:1 --layer sweep   # at the sweep's best layer
    python -m apps chat --steer evil:-1                    # the applications: apps/

Read it from the top. First the method, in the paper's order, as short functions on tensors
    1. prompts      contrasting system prompts (trait-eliciting "pos", trait-suppressing "neg") per question
    2. answers      sampled under each, with their activations captured while they are generated
    3. filter       keep the pairs whose pos answer shows the trait and whose neg answer does not (the judge)
    4. vector       mean(pos activations) - mean(neg activations), at every layer
    5. monitor      project an activation on the unit vector
    6. steer        add coef * v[L] to the residual stream while generating (negative coef: away from the trait)
    7. shift        how far finetuning moved the activations along the vector (the finetuning shift)
    8. flag         ΔP: how much further along the vector a training response sits than the model's own
then the paper's pipelines that run them over files (resumable, cached): extract, generate, eval, sweep,
monitor-experiment, make-dataset, shift; and the command line at the bottom. Every pipeline is a plain function
here: import it. What they stand on (sampling budget, vector and batch files, statistics, plots,
the command line's argument types) is in support/; the applications (monitor over conversation
files, chat, serve, flag, control vectors, new traits) are in apps/, above this file, with their
own command line: python -m apps.
"""

import argparse
import datetime
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import model as M
from support import UserError, checkpoint, tokenizer
from support.capping import CapSpec, caps_for, merged, parse_cap, spec_vector
from support.cli import (
    COEF,
    COUNT,
    LAYER,
    MAX_NEW_TOKENS,
    OUTPUT_DIR,
    OUTPUT_FILE,
    SCORE,
    SEED,
    TEMPERATURE,
    TEXT_FILE,
    TOP_P,
    check_paths,
    layer_or_sweep,
    listed,
    run,
    torch_dtype,
)
from support.files import (
    VARIANTS,
    atomic_write,
    check_fits,
    check_name_length,
    check_output,
    check_writable,
    default_vectors_dir,
    expect_model,
    load_batch,
    load_vector,
    locked,
    other_vectors,
    read_text,
    resolve_layer,
    save_batch,
    save_vector,
    short_label,
    vector_file,
    vector_path,
    write_csv,
)
from support.hub import DEFAULT_MODEL
from support.plots import plot_monitor, plot_sweep
from support.sampling import Budget, budget_for, check_count, check_new_tokens, settings_hash
from support.stats import (
    bootstrap_ci,
    mean_se,
    pearson,
    permutation_p,
    random_band,
    random_directions,
    spearman,
    within_r,
)
from support.traits import QUESTIONS_FILE, load_questions, load_trait

LAYER_CONVENTION = "index 0 = embeddings, index L = output of block L (before the final norm); shape [L + 1, hidden]"


# ===============================================================================================================
# The method
# ===============================================================================================================

# 1. Prompts: every (question, instruction pair, rollout), once under the pos and once under the neg system prompt.


def rollout_jobs(trait, questions: int, rollouts: int) -> list[dict]:
    """Every (question, instruction pair, rollout) once per side; pos and neg of a pair sit next to each other."""
    return [
        dict(
            key=f"{side}:{i}:{qi}:{r}",
            side=side,
            instruction=i,
            question_id=qi,
            rollout=r,
            question=question,
            system=trait.system_prompt(side, i),
        )
        for qi, question in enumerate(trait.extract_questions[:questions])
        for i in range(len(trait.instructions))
        for r in range(rollouts)
        for side in ("pos", "neg")
    ]


def conversation(job: dict) -> list[dict]:
    """A job's chat: its system prompt (None: the template decides), earlier turns ("shots"), then the question."""
    system = [{"role": "system", "content": job["system"]}] if job.get("system") is not None else []
    return system + job.get("shots", []) + [{"role": "user", "content": job["question"]}]


# 2. Answers with their activations, captured while they are generated (no second pass).


@torch.no_grad()
def answer_with_activations(
    model: M.Transformer,
    tok,
    chats: list[list[dict]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    steer: list[M.Steer] = (),
    cap: list[M.Cap] = (),
):
    """Answer each chat -> (answer token ids per chat, {variant: [B, N + 1, hidden]} activations); steered, then
    capped (after it, cap[0].fired counts the capped positions of each: the last prompt token and the answer's).

    Variants: response_avg (mean over the answer's tokens), prompt_avg (mean over the prompt), prompt_last (the
    last prompt token, from which the answer is written), and response_norm [B, N + 1] (mean per-token norm).
    """
    rec = M.Capture()
    # thinking: the response span is the answer after </think>
    after = tokenizer.think_marks(tok) if getattr(tok, "thinking", False) else None
    outs = M.generate(
        model,
        [tok.encode_chat(c) for c in chats],
        max_new_tokens,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        steer=steer,
        capture=rec,
        cap=cap,
        answer_after=after,
    )
    return outs, {
        "response_avg": rec.answer_mean(),
        "prompt_avg": rec.prompt_mean(),
        "prompt_last": rec.prompt_last(),
        "response_norm": rec.answer_norm(),
    }


@torch.no_grad()
def read_answers(model: M.Transformer, prompts: list[list[int]], answers: list[list[int]]) -> dict:
    """The same activations for given prompt and answer tokens, as the model (unsteered) reads them in one pass.

    This is how a steered answer is measured: steering at layer L adds coef * v[L] to every answer token, so
    activations captured while steering measure the steering itself; the paper projects what the plain model
    makes of the text.
    """
    device = model.lm_head.weight.device
    ids, mask = M.left_pad([p + a for p, a in zip(prompts, answers)])
    start = torch.tensor(
        [ids.shape[1] - len(a) for a in answers]
    )  # column where each answer begins
    cap = M.Capture()
    model(
        ids.to(device), mask.to(device), answer_start=start.to(device), capture=cap, logits="none"
    )
    return {
        "response_avg": cap.answer_mean(),
        "prompt_avg": cap.prompt_mean(),
        "prompt_last": cap.prompt_last(),
    }


# 3. Filter: keep the pairs the judge finds clear.


def keep_pairs(
    rows: list[dict], trait: str, judged: bool, pos_min: float, neg_max: float, coherence_min: float
):
    """Indices of the pos and neg rows of every pair kept: pos >= pos_min, neg < neg_max, both coherent, both
    non-empty (an empty answer has no mean activation)."""
    by_key = {r["key"]: n for n, r in enumerate(rows)}
    pos, neg, why = (
        [],
        [],
        {"pos trait score": 0, "neg trait score": 0, "coherence": 0, "empty answer": 0},
    )
    for n, r in enumerate(rows):
        if r["side"] != "pos":
            continue
        m = by_key["neg" + r["key"][3:]]
        q = rows[m]
        if r.get("n_tokens") == 0 or q.get("n_tokens") == 0:
            why["empty answer"] += 1
            continue
        if judged:
            ok_pos = r[trait] is not None and r[trait] >= pos_min
            ok_neg = q[trait] is not None and q[trait] < neg_max
            ok_coh = all(
                x["coherence"] is not None and x["coherence"] >= coherence_min for x in (r, q)
            )
            why["pos trait score"] += not ok_pos
            why["neg trait score"] += not ok_neg
            why["coherence"] += not ok_coh
            if not (ok_pos and ok_neg and ok_coh):
                continue
        pos.append(n)
        neg.append(m)
    return pos, neg, why


# 4. The persona vector.


def persona_vector(pos_acts: torch.Tensor, neg_acts: torch.Tensor) -> torch.Tensor:
    """Mean activation of the kept pos answers minus that of the kept neg answers: [n, N + 1, hidden] -> [N + 1, hidden]."""
    return pos_acts.mean(0) - neg_acts.mean(0)


# 5. Monitoring: where an activation falls along the vector.


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def project(acts: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Projection of activations [..., hidden] on the unit vector along v [hidden] -> [...]."""
    return acts.float() @ unit(v.float()).to(acts.device)


# 6. Steering.


def steer_at(
    v: torch.Tensor,
    layer: int,
    coef: float,
    all_layers: bool = False,
    positions: str = "response",
    last_block: int | None = None,
) -> list[M.Steer]:
    """coef * v[layer] added after block `layer`; or, all_layers (the paper's multi-layer variant), the increment
    coef * (v[l] - v[l-1]) after every block l = 1..last_block, so that block l has received coef * (v[l] - v[0])."""
    if not all_layers:
        return [M.Steer(layer, v[layer], coef, positions)]
    last_block = last_block or v.shape[0] - 1
    return [M.Steer(l, v[l] - v[l - 1], coef, positions) for l in range(1, last_block + 1)]


# 7. Finetuning: how far training moved the model along the vector (the paper's finetuning shift).


def finetuning_shift(
    base_acts: torch.Tensor, finetuned_acts: torch.Tensor, vector: torch.Tensor
) -> torch.Tensor:
    """The paper's finetuning shift at every layer: (mean finetuned - mean base activation) . unit vector.

    base_acts, finetuned_acts: [Q, N + 1, hidden], the same questions; vector: [N + 1, hidden] -> [N + 1].
    """
    delta = finetuned_acts.float().mean(0) - base_acts.float().mean(0)  # [N + 1, hidden]
    return (delta * unit(vector.float())).sum(-1)


@torch.no_grad()
def last_prompt_activations(
    model, tok, questions: list[str], batch_size: int = 32, steer: list[M.Steer] = ()
) -> torch.Tensor:
    """The residual stream at the last prompt token (the position the reply is written from) of each question as a
    single user turn, chat template with no system prompt beyond the template's own -> [Q, N + 1, hidden] fp32.
    steer: interventions during the pass (an inference-time steered model), recorded after they are added."""
    device, out = model.lm_head.weight.device, []
    for i in range(0, len(questions), batch_size):
        ids, mask = M.left_pad(
            [
                tok.encode_chat([{"role": "user", "content": q}])
                for q in questions[i : i + batch_size]
            ],
            tok.pad_id,
        )
        cap = M.Capture()
        model(ids.to(device), mask.to(device), steer=steer, capture=cap, logits="none")
        out.append(cap.prompt_last().cpu())
    return torch.cat(out)


# 8. Flagging data: does a training response sit further along the trait than the model's own would?


def projection_difference(
    response: torch.Tensor, base: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """ΔP per sample: (a(x, y) - a(x, y')) · v̂. response, base: [B, hidden] mean activations; v: [hidden].

    >>> projection_difference(torch.tensor([[3., 1.]]), torch.tensor([[1., 5.]]), torch.tensor([2., 0.]))
    tensor([2.])
    """
    return project(response - base, v)


# ===============================================================================================================
# The paper's pipelines: the method over files, resumable and cached
# ===============================================================================================================


def sample_rollouts(
    model,
    tok,
    jobs: list[dict],
    budget: Budget,
    seed: int,
    work: Path,
    steer: list[M.Steer] = (),
    cap: list[M.Cap] = (),
) -> tuple[list[dict], dict]:
    """Generate every job's answer and capture its activations, batch by batch, each batch saved as it finishes.

    jobs: dicts with "key", "question" and "system" (None: no system message, the template decides), and
    optionally "shots": earlier user/assistant messages placed before the question.
    A batch file holds the batch's rows (metadata) and their per-layer activations; a rerun loads finished batches
    and samples only the missing ones, each with its own seed, so the result does not depend on interruptions.
    """
    rows, acts = [], {v: [] for v in VARIANTS + ("response_norm",)}
    batches = [jobs[i : i + budget.batch_size] for i in range(0, len(jobs), budget.batch_size)]
    t0, done_now = time.time(), 0
    for b, batch in enumerate(batches):
        path = work / f"batch-{b:05d}.safetensors"
        if not path.exists():
            chats = [conversation(j) for j in batch]
            outs, tensors = answer_with_activations(
                model,
                tok,
                chats,
                budget.max_new_tokens,
                budget.temperature,
                budget.top_p,
                seed * 1_000_003 + b,
                steer,
                cap,
            )
            # (think block, answer) per row: ([], reply) unless --thinking
            parts = [tokenizer.split_thinking(tok, o) for o in outs]
            # an empty answer's means are NaN by design
            answered = torch.tensor([len(a) > 0 for _, a in parts])
            if not (
                torch.isfinite(tensors["prompt_last"]).all()
                and torch.isfinite(tensors["response_avg"][answered]).all()
            ):
                raise UserError(
                    "the activations became non-finite (inf/NaN) while generating: the steering "
                    "coefficient is too large for this model; use a smaller one"
                )
            fired = (
                cap[0].fired.tolist() if cap else [None] * len(batch)
            )  # positions capped (None: no cap)
            think = [
                {"thinking": tok.decode(th), "think_ids": th} if tok.thinking else {}
                for th, _ in parts
            ]
            new = [
                j
                | {
                    "answer": tok.decode(a),
                    "answer_ids": a,
                    "n_tokens": len(a),
                    "prompt": tok.chat(c),
                    "capped": f,
                }
                | th
                for j, (_, a), c, f, th in zip(batch, parts, chats, fired, think)
            ]
            save_batch(path, new, tensors)
            done_now += len(batch)
            rate = done_now / (time.time() - t0)
            left = sum(len(x) for x in batches[b + 1 :])
            print(
                f"rollouts: {sum(len(x) for x in batches[: b + 1])}/{len(jobs)} "
                f"({rate:.1f}/s, about {left / rate:.0f} s left)",
                file=sys.stderr,
                flush=True,
            )
        batch_rows, batch_acts = load_batch(path, list(acts))
        if [r["key"] for r in batch_rows] != [j["key"] for j in batch]:
            raise UserError(f"{path} does not hold this run's answers: delete {work} and run again")
        rows += batch_rows
        for k in acts:
            acts[k].append(batch_acts[k])
    if done_now < len(jobs):
        print(
            f"rollouts: {len(jobs) - done_now} of {len(jobs)} loaded from {work}", file=sys.stderr
        )
    return rows, {k: torch.cat(v) for k, v in acts.items()}


def load_checked(
    model_name: str,
    device,
    dtype,
    steer: list[str] = (),
    vectors: str | None = None,
    judge: str | None = "none",
    judge_workers: int | None = None,
    trait=None,
    cap: list[str] = (),
    thinking: bool = False,
):
    """Check what can be checked before the model loads (device, --steer and --cap specs and their vector files, the
    judge: one that cannot work, with no API key, fails here), then load it. -> (model, tokenizer, vectors_dir,
    judge). A trait's judge prompt that never asks for REFUSAL (official-format trait files may not) is worth a
    note: refusals then get a score like any other answer, where the judge would otherwise leave them unscored."""
    import judge as J

    checkpoint.check_device(device or checkpoint.default_device())
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model_name)
    for spec in steer:
        SteerSpec.parse(spec).file(vectors_dir)
    for spec in cap:
        spec_vector(parse_cap(spec), vectors_dir)
    judge_ = J.make_judge(judge, workers=judge_workers)
    if trait is not None and judge_.name != "none" and "REFUSAL" not in trait.eval_prompt:
        print(
            f"note: the eval_prompt of {trait.source or trait.name} never asks the judge to answer REFUSAL, so "
            "refused answers are scored like any other",
            file=sys.stderr,
        )
    model, tok = checkpoint.load(model_name, device, dtype)
    tok.thinking = thinking  # the template's thinking mode; the answer: after </think>
    if thinking:
        tokenizer.think_marks(tok)  # a model without a thinking mode fails here
    return model, tok, vectors_dir, judge_


def open_pipeline(
    t,
    questions: int,
    model_name: str,
    device,
    dtype,
    judge,
    judge_workers,
    budget: tuple,
    out=None,
    vectors=None,
    steer: list[str] = (),
    cap: list[str] = (),
    thinking: bool = False,
):
    """How every judged pipeline opens, after its trait `t` is loaded: the checks (--questions among them), the model
    and the judge, the budget (rollouts, max_new_tokens, temperature, top_p, batch_size; None: the default) and a
    writable output directory (default: the vectors directory) -> (model, tokenizer, judge, budget, vectors_dir,
    out_dir)."""
    check_count("questions", questions)
    model, tok, vectors_dir, judge_ = load_checked(
        model_name, device, dtype, steer, vectors, judge, judge_workers, t, cap, thinking
    )
    b = budget_for(model, *budget)
    out_dir = Path(out) if out else vectors_dir
    check_writable(out_dir)
    return model, tok, judge_, b, vectors_dir, out_dir


def sample_and_judge(
    t,
    model,
    tok,
    judge,
    jobs: list[dict],
    budget: Budget,
    seed: int,
    out_dir: Path,
    name: str,
    settings: dict,
    steer: list[M.Steer] = (),
    cap: list[M.Cap] = (),
) -> tuple[list[dict], dict, str]:
    """Every job answered (cached in OUT/.work/NAME-<settings hash>/) and judged (cached in
    OUT/.work/judgments.jsonl) -> (rows, activations, the judge's name)."""
    import judge as J  # imported where a pipeline judges, as in load_checked

    work = out_dir / ".work" / f"{name}-{settings_hash(settings)}"
    with locked(work):  # one run at a time on these batches: a second one stops, naming this one
        rows, acts = sample_rollouts(model, tok, jobs, budget, seed, work, steer, cap)
        return rows, acts, J.judge_rows(t, rows, judge, out_dir / ".work" / "judgments.jsonl")


def extract(
    trait: str,
    model_name: str = DEFAULT_MODEL,
    judge: str | None = None,
    judge_workers: int | None = None,
    rollouts: int | None = None,
    max_new_tokens: int | None = None,
    questions: int = 20,
    out: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    pos_threshold: float = 50,
    neg_threshold: float = 50,
    coherence_threshold: float = 50,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    thinking: bool = False,
) -> dict:
    """Extract a persona vector for `trait` -> {variant: path of its .safetensors file, "csv_pos"/"csv_neg": ...}.

    For each extraction question x instruction pair x rollout, answers are sampled under the trait-eliciting (pos)
    and trait-suppressing (neg) system prompts, judged, and a pair is kept when pos >= pos_threshold,
    neg < neg_threshold and both coherences >= coherence_threshold. The vector of each variant is
    mean(kept pos activations) - mean(kept neg activations) at every layer.
    thinking: the template's thinking mode on; the answer judged and averaged is the text after
    `</think>` (see docs/model.md).
    """
    t = load_trait(trait)
    model, tok, judge_, b, _, out_dir = open_pipeline(
        t,
        questions,
        model_name,
        device,
        dtype,
        judge,
        judge_workers,
        (rollouts, max_new_tokens, temperature, top_p, batch_size),
        out,
        thinking=thinking,
    )
    questions = min(questions, len(t.extract_questions))
    settings = dict(
        model=model_name,
        trait=t.name,
        trait_sha=hashlib.sha256(json.dumps(asdict(t), default=str).encode()).hexdigest(),
        questions=questions,
        seed=seed,
        dtype=str(model.lm_head.weight.dtype),
        **asdict(b),
        **({"thinking": True} if thinking else {}),
    )
    jobs = rollout_jobs(t, questions, b.rollouts)
    print(
        f"extract {t.name}: {len(jobs)} answers ({questions} questions x {len(t.instructions)} instruction pairs x "
        f"{b.rollouts} rollouts x 2 sides), up to {b.max_new_tokens} tokens at temperature {b.temperature}, "
        f"top-p {b.top_p}",
        file=sys.stderr,
    )
    rows, acts, judge_name = sample_and_judge(
        t, model, tok, judge_, jobs, b, seed, out_dir, t.name, settings
    )
    judged = judge_name != "none"
    if not judged:
        print(
            "judge: NONE -- no answer is filtered; the vector averages every sample (recorded in its metadata)",
            file=sys.stderr,
        )
    if judged and all(r[t.name] is None for r in rows):
        raise UserError(
            f"the judge ({judge_name}) gave no score to any of {len(rows)} answers (refusals, or no "
            "numbers among its top tokens): check the judge model and the trait's eval_prompt, then "
            f"delete {out_dir / '.work' / 'judgments.jsonl'} to judge again"
        )
    pos, neg, why = keep_pairs(
        rows, t.name, judged, pos_threshold, neg_threshold, coherence_threshold
    )
    n_pairs = len(jobs) // 2
    if not pos:
        worst = max(why, key=why.get)
        fix = {
            "pos trait score": "relax --pos-threshold",
            "neg trait score": "relax --neg-threshold",
            "coherence": "relax --coherence-threshold",
            "empty answer": "raise --max-new-tokens",
        }[worst]
        raise UserError(
            f"no pair of {n_pairs} survived the filter ({why[worst]} failed on {worst}): {fix}, "
            "or sample more with --rollouts"
        )
    norms = acts["response_norm"][pos + neg].mean(
        0
    )  # [L + 1] mean per-token residual norm of kept answers
    # the model's name, local path and the weights' origin (a vector made from dequantized GGUF weights must never
    # pass for one made from the original weights)
    meta = dict(
        model=model.name_or_path,
        model_path=str(model.source_dir),
        model_source=getattr(model, "source", None),
        trait=t.name,
        layer_convention=LAYER_CONVENTION,
        judge=judge_name,
        pos_threshold=pos_threshold,
        neg_threshold=neg_threshold,
        coherence_threshold=coherence_threshold,
        kept_pairs=len(pos),
        total_pairs=n_pairs,
        kept_pos=len(pos),
        total_pos=n_pairs,
        kept_neg=len(neg),
        total_neg=n_pairs,
        residual_norm=[round(x, 4) for x in norms.tolist()],
        date=datetime.date.today().isoformat(),
        **{k: v for k, v in settings.items() if k not in ("model", "trait")},
    )
    meta |= dict(thinking=thinking, system_folded=tok.system_folded)  # how the chats were rendered
    vectors = {
        v: persona_vector(acts[v][pos], acts[v][neg]) for v in VARIANTS
    }  # each [L + 1, hidden]
    # where kept pos and neg answers fall along the unit vector, per layer: the reference marks of `chat`'s gauge
    for side, idx in (("pos", pos), ("neg", neg)):
        for kind in ("prompt_last", "response_avg"):
            meta[f"{side}_{kind}_projection"] = [
                round(x, 4)
                for x in (acts[kind][idx].mean(0) * unit(vectors["response_avg"])).sum(-1).tolist()
            ]
    paths = {
        variant: save_vector(
            vector_path(out_dir, t.name, variant),
            vec,
            meta
            | dict(variant=variant, vector_norm=[round(x, 4) for x in vec.norm(dim=-1).tolist()]),
        )
        for variant, vec in vectors.items()
    }
    kept = set(pos) | set(neg)
    for n, r in enumerate(rows):
        r["kept"] = n in kept
    for side in ("pos", "neg"):
        paths[f"csv_{side}"] = (
            out_dir / f"{t.name}_{side}_instruct.csv"
        )  # the official repository's columns first
        write_csv(
            paths[f"csv_{side}"],
            [r for r in rows if r["side"] == side],
            [
                "question",
                "prompt",
                "answer",
                "question_id",
                t.name,
                "coherence",
                "instruction",
                "rollout",
                "kept",
            ],
        )
    rel = vectors["response_avg"].norm(dim=-1) / norms.clamp(min=1e-6)
    top = rel[1:].topk(min(5, len(rel) - 1)).indices + 1
    print(
        f"kept {len(pos)}/{n_pairs} pairs (pos {len(pos)}/{n_pairs}, neg {len(neg)}/{n_pairs}); judge: {judge_name}"
        + ("" if judged else " (no filtering)")
        + "".join(f"; {v} {k}" for k, v in why.items() if v and not judged),
        file=sys.stderr,
    )
    print(
        "layers with the largest |v| / mean residual norm: "
        + ", ".join(f"{int(l)} ({rel[l]:.2f})" for l in top),
        file=sys.stderr,
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Vectors for a model: the fit check, and steering by --steer specs (SteerSpec; --cap specs:
# support/capping.py's CapSpec).


def model_vector(path: Path, model) -> tuple[torch.Tensor, dict]:
    """A vector file checked against the model it is used with -> (tensor [N + 1, hidden], metadata)."""
    vec, meta = load_vector(path)
    check_fits(vec, meta, path, model.config.num_hidden_layers, model.config.hidden_size, model)
    return vec, meta


@dataclass(frozen=True)
class SteerSpec:
    """A --steer spec, parsed once: "TRAIT:COEF" or "FILE.safetensors:COEF", COEF raw (coef * v,
    the paper's) or relative to the residual norm ("0.1r").

    >>> SteerSpec.parse("humorous:-0.1r")
    SteerSpec(source='humorous', coef=-0.1, relative=True, text='humorous:-0.1r')
    """

    source: str  # a trait name (its vector in the vectors directory), or a .safetensors file
    coef: float
    relative: bool
    text: str  # the spec as given: in messages, file labels and settings hashes

    @classmethod
    def parse(cls, spec: "str | SteerSpec") -> "SteerSpec":
        if isinstance(spec, SteerSpec):
            return spec
        source, sep, coef = spec.rpartition(":")
        relative = coef.endswith("r")
        try:
            value = float(coef[:-1] if relative else coef)
        except ValueError:
            value = None
        if not sep or not source or value is None:
            raise UserError(
                f"--steer {spec!r}: expected TRAIT:COEF or FILE.safetensors:COEF, "
                "e.g. evil:1.5 or evil:0.1r"
            )
        if not math.isfinite(value):
            raise UserError(f"--steer {spec!r}: the coefficient must be a finite number")
        return cls(source, value, relative, spec)

    def file(self, vectors_dir: Path) -> Path:
        """The vector file it names, checked to exist (before any model is loaded)."""
        return vector_file(self.source, vectors_dir, f"--steer {self.text!r}: ")


def parsed(steer=(), cap=()) -> tuple[list[SteerSpec], list[CapSpec]]:
    """--steer and --cap specs, as text or parsed already -> parsed, each once."""
    return [SteerSpec.parse(s) for s in steer], [parse_cap(c) for c in cap]


MAX_STEER_RATIO = 100  # a steering vector 100x the residual stream's norm only overflows: refuse it


def steering(
    specs: list[str | SteerSpec],
    model: M.Transformer,
    vectors_dir: str | Path | None = None,
    layer: int | str | None = None,
    positions: str = "response",
    all_layers: bool = False,
) -> list[M.Steer]:
    """The Steer interventions for --steer specs; the one place their size is checked
    (MAX_STEER_RATIO).

    Units: a raw coefficient multiplies the vector as saved (the paper's `coef * v`); a relative one ('0.1r') adds
    a vector whose norm is that fraction of the mean residual norm at the layer (recorded by `extract`), i.e.
    raw = rel * residual_norm[layer] / |v[layer]|, so a setting transfers between models.
    Layer: see `resolve_layer`. all_layers: `steer_at`'s multi-layer variant.
    """
    N = model.config.num_hidden_layers
    vectors_dir = (
        Path(vectors_dir)
        if vectors_dir
        else default_vectors_dir(getattr(model, "name_or_path", "model"))
    )
    out = []
    for spec in map(SteerSpec.parse, specs):
        path, coef, relative = spec.file(vectors_dir), spec.coef, spec.relative
        vec, meta = model_vector(path, model)
        vec = vec.to(model.lm_head.weight.device)  # once, not at every decoding step
        L = resolve_layer(layer, meta, N, path)
        norms = meta.get("residual_norm")
        if relative and not norms:
            raise UserError(
                f"--steer {spec.text!r}: {path.name} records no residual norms "
                "(imported vectors do not), so a relative coefficient has no unit; "
                "give a raw one, e.g. evil:1.5"
            )
        if relative:
            coef = coef * norms[L] / float(vec[L].norm())
        scale = norms[L] if norms else 10 * float(vec[L].norm())
        if abs(coef) * float(vec[L].norm()) > MAX_STEER_RATIO * scale:
            limit = (
                f"{MAX_STEER_RATIO}r"
                if relative
                else f"{MAX_STEER_RATIO * scale / float(vec[L].norm()):.3g}"
            )
            ratio = abs(coef) * float(vec[L].norm()) / scale
            raise UserError(
                f"--steer {spec.text!r}: that adds a vector {ratio:.3g}x the residual "
                f"stream's norm at layer {L}, which overflows; use a coefficient of at "
                f"most {limit} in size"
            )
        last = N - 1 if meta.get("last_row_post_norm") else N
        if all_layers and last < N:
            print(
                f"note: {path.name} is an imported vector whose last row is post-norm: steering blocks 1..{last}",
                file=sys.stderr,
            )
        out += steer_at(vec, L, coef, all_layers, positions, last)
    return out


def interventions(
    model: M.Transformer,
    vectors_dir: Path,
    steer=(),
    cap=(),
    layer=None,
    positions="response",
    all_layers=False,
) -> tuple[list[M.Steer], list[M.Cap]]:
    """--steer and --cap specs -> (Steers, [] or one Cap), every check done. The model steers first, then caps
    (model.py), so a cap bounds what steering added too; one Cap for all specs counts a token capped twice once."""
    return (
        steering(list(steer), model, vectors_dir, layer, positions, all_layers),
        merged(caps_for(list(cap), model, vectors_dir)),
    )


def file_label(specs: list[SteerSpec | CapSpec], prefix: str = "") -> str:
    """--steer or --cap specs in a file name: 'evil:1.5', 'a/v.safetensors:2' -> 'evil@1.5_a-v.safetensors@2'."""
    names = (prefix + spec.text.replace("/", "-").replace(":", "@") for spec in specs)
    return short_label("_".join(names))  # a hash of the long part: see short_label


# ---------------------------------------------------------------------------------------------------------------
# Generation, evaluation and sweeps.


def generate(
    prompts: list[str],
    model_name: str = DEFAULT_MODEL,
    system: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    steer: list[str] = (),
    layer: int | None = None,
    positions: str = "response",
    all_layers: bool = False,
    cap: list[str] = (),
    vectors: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    thinking: bool = False,
) -> list[str]:
    """Answer each prompt as a single-turn chat (greedy unless temperature > 0), optionally steered and capped.

    steer: specs like "evil:1.5", "humorous:-0.1r" or "path/v.safetensors:2" (see `steering`); negative coefficients
    steer away from the trait; cap: "evil", "evil:75@12-20" (support/capping.py), the positions capped are printed.
    With system=None the model's own chat template decides (Qwen2.5 and SmolLM2 insert their default system prompt).
    thinking: the template's thinking mode on; each reply is returned whole, think block included.
    """
    if not prompts:
        raise UserError("no prompt: give one or more, or --prompts-file FILE")
    Budget(1, max_new_tokens, temperature, top_p, 1)  # the same checks as every pipeline's
    steer, cap = parsed(steer, cap)
    model, tok, vectors_dir, _ = load_checked(
        model_name, device, dtype, steer, vectors, cap=cap, thinking=thinking
    )
    steers, caps = interventions(model, vectors_dir, steer, cap, layer, positions, all_layers)
    ids = [tok.encode_chat(conversation(dict(system=system, question=p))) for p in prompts]
    check_new_tokens(model, max_new_tokens, max(len(x) for x in ids))
    out = M.generate(
        model,
        ids,
        max_new_tokens,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        steer=steers,
        cap=caps,
        progress=True,
    )
    if caps:
        print(
            "capped positions (the last prompt token and the answer's) per prompt: "
            + ", ".join(f"{n}/{len(o) + 1}" for n, o in zip(caps[0].fired.tolist(), out)),
            file=sys.stderr,
        )
    return [tok.decode(o) for o in out]


def _evaluate(
    t,
    model,
    tok,
    judge,
    budget: Budget,
    *,
    questions: int,
    steer: list[SteerSpec],
    cap: list[CapSpec],
    layer: int | str | None,
    vectors_dir: Path,
    out_dir: Path,
    seed: int,
    label: str,
    positions: str = "response",
    all_layers: bool = False,
) -> dict:
    """One setting of `evaluate` (and of each cell of `sweep`) on a loaded model -> its means and its CSV."""
    steers, caps = interventions(model, vectors_dir, steer, cap, layer, positions, all_layers)
    N = model.config.num_hidden_layers
    vec_file = vector_path(vectors_dir, t.name)
    vec, meta = model_vector(vec_file, model) if vec_file.is_file() else (None, {})
    proj_layer = (
        steers[0].layer if steers and not all_layers else resolve_layer(layer, meta, N, vec_file)
    )
    jobs = [
        dict(key=f"eval:{qi}:{r}", question_id=qi, rollout=r, question=q, system=None)
        for qi, q in enumerate(t.eval_questions[:questions])
        for r in range(budget.rollouts)
    ]
    settings = dict(
        model=model.name_or_path,
        trait=t.name,
        questions=questions,
        seed=seed,
        steer=[s.text for s in steer],
        layer=layer,
        positions=positions,
        all_layers=all_layers,
        **asdict(budget),
        **({"thinking": True} if tok.thinking else {}),
    )
    if caps:  # a capped run, its own cache
        settings |= dict(cap=[c.text for c in cap], ceilings=caps[0].ceilings.tolist())
    print(
        f"eval {t.name} [{label}]: {len(jobs)} answers ({questions} questions x {budget.rollouts} samples)",
        file=sys.stderr,
    )
    rows, _, judge_name = sample_and_judge(
        t, model, tok, judge, jobs, budget, seed, out_dir, f"eval-{t.name}", settings, steers, caps
    )
    if (
        vec is not None
    ):  # each answer as the plain model (unsteered, uncapped) reads it, on the trait's unit vector
        for i in range(0, len(rows), budget.batch_size):
            batch = rows[i : i + budget.batch_size]
            # a think block (--thinking) is read as context, with the prompt
            prompts = [tok.encode_chat(conversation(r)) + r.get("think_ids", []) for r in batch]
            acts = read_answers(model, prompts, [r["answer_ids"] for r in batch])
            proj = project(acts["response_avg"][:, proj_layer], vec[proj_layer]).tolist()
            for r, p in zip(batch, proj):
                r["projection"] = p if r["n_tokens"] else None
    for r in rows:
        r["judge"] = judge_name
    trait_m, trait_se, n = mean_se(r[t.name] for r in rows)
    coh_m, coh_se, _ = mean_se(r["coherence"] for r in rows)
    proj_m, proj_se, _ = mean_se(r.get("projection") for r in rows)
    csv_path = out_dir / "eval" / f"{t.name}_{label}.csv"
    write_csv(
        csv_path,
        rows,
        ["question", "answer", "question_id", "rollout", t.name, "coherence", "projection", "judge"]
        + (["capped", "n_tokens"] if caps else []),
    )
    share = sum(r["capped"] for r in rows) / sum(r["n_tokens"] + 1 for r in rows) if caps else None
    return dict(
        trait=t.name,
        label=label,
        judge=judge_name,
        n=len(rows),
        judged=n,
        trait_mean=trait_m,
        trait_se=trait_se,
        coherence_mean=coh_m,
        coherence_se=coh_se,
        projection_mean=proj_m,
        projection_se=proj_se,
        projection_layer=proj_layer,
        cap=[c.text for c in cap],
        capped_share=share,
        csv=str(csv_path),
    )


def _format(x, se=None) -> str:
    return "n/a" if x is None else f"{x:.1f}" + ("" if se is None else f" +- {se:.1f}")


def evaluate(
    trait: str,
    model_name: str = DEFAULT_MODEL,
    judge: str | None = None,
    judge_workers: int | None = None,
    samples: int | None = None,
    questions: int = 20,
    steer: list[str] = (),
    layer: int | None = None,
    positions: str = "response",
    all_layers: bool = False,
    cap: list[str] = (),
    vectors: str | None = None,
    out: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    thinking: bool = False,
) -> dict:
    """Trait expression on the trait's evaluation questions (never the extraction ones), optionally steered and capped.

    Answers are sampled with no system prompt, `samples` per question (greedy when there is one, as in the
    official evaluation), and judged for the trait and coherence -> means with standard errors, the mean projection
    of the answers (read by the plain model) on the trait's vector, the share of answer positions capped, and the
    answers as CSV. With the `none` judge only the answers and projections are reported.
    """
    t = load_trait(trait)
    steer, cap = parsed(steer, cap)
    model, tok, judge_, b, vectors_dir, out_dir = open_pipeline(
        t,
        questions,
        model_name,
        device,
        dtype,
        judge,
        judge_workers,
        (samples, max_new_tokens, temperature, top_p, batch_size),
        out,
        vectors,
        steer,
        cap,
        thinking,
    )
    if b.rollouts == 1 and temperature is None:
        b.temperature = 0.0
    label = (
        "_".join(
            x
            for x in (
                steer
                and file_label(steer)
                + (f"_L{layer}" if layer is not None else "")
                + ("_all" if all_layers else ""),
                file_label(cap, "cap-"),
            )
            if x
        )
        or "base"
    )
    label = short_label(label)
    check_name_length(out_dir / "eval" / f"{t.name}_{label}.csv", "the trait's name")  # before
    r = _evaluate(
        t,
        model,
        tok,
        judge_,
        b,
        questions=min(questions, len(t.eval_questions)),
        steer=steer,
        cap=cap,
        layer=layer,
        positions=positions,
        all_layers=all_layers,
        vectors_dir=vectors_dir,
        out_dir=out_dir,
        seed=seed,
        label=label,
    )
    print(
        f"{t.name} [{label}]: trait {_format(r['trait_mean'], r['trait_se'])}, coherence "
        f"{_format(r['coherence_mean'], r['coherence_se'])} ({r['judged']}/{r['n']} judged by {r['judge']}); "
        f"projection at layer {r['projection_layer']}: {_format(r['projection_mean'], r['projection_se'])}; "
        + (f"{r['capped_share']:.1%} of answer positions capped; " if cap else "")
        + f"answers in {r['csv']}",
        file=sys.stderr,
    )
    return r


def best_setting(results: list[dict], coherence_min: float = 75) -> dict | None:
    """The sweep's choice: the highest mean trait score among settings whose mean coherence stays >= coherence_min.

    >>> best_setting([dict(layer=10, coef=2, trait_mean=80, coherence_mean=60),
    ...               dict(layer=12, coef=1, trait_mean=55, coherence_mean=81)])["layer"]
    12
    """
    ok = [
        r
        for r in results
        if r["trait_mean"] is not None
        and r["coherence_mean"] is not None
        and r["coherence_mean"] >= coherence_min
    ]
    return max(ok, key=lambda r: r["trait_mean"]) if ok else None


def sweep(
    trait: str,
    model_name: str = DEFAULT_MODEL,
    judge: str | None = None,
    judge_workers: int | None = None,
    layers: list[int] | None = None,
    coefs: list[float] | None = None,
    relative: bool = False,
    samples: int | None = None,
    questions: int = 20,
    coherence_min: float = 75,
    cap: list[str] = (),
    vectors: str | None = None,
    out: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    thinking: bool = False,
) -> dict:
    """Evaluate steering over a grid of layers x coefficients -> CSV, plot, and the best setting
    in its own file.

    Defaults: six layers spread over the middle two thirds of the network, the paper's coefficients
    0.5 to 2.5 (raw), or 0.05 to 0.25 of the residual norm with relative=True. The best setting
    (highest trait score with coherence >= coherence_min) goes to TRAIT_sweep.json beside the CSV;
    the vector file is never changed, and a later command steers at the sweep's layer only when
    told (--layer sweep). Each setting is cached like `extract`, so an interrupted sweep resumes.
    cap: --cap specs applied after the steering in every setting, named in the CSV and in the
    result's file name (TRAIT_sweep_cap-...json, which --layer sweep does not read).
    """
    t = load_trait(trait)
    cap = parsed(cap=cap)[1]
    vec_path = vector_path(Path(vectors) if vectors else default_vectors_dir(model_name), t.name)
    model, tok, judge_, b, vectors_dir, out_dir = open_pipeline(
        t,
        questions,
        model_name,
        device,
        dtype,
        judge,
        judge_workers,
        (samples, max_new_tokens, None, None, batch_size),
        out,
        vectors,
        [SteerSpec.parse(f"{vec_path}:0")],
        cap,
        thinking,
    )
    N = model.config.num_hidden_layers
    _, meta = model_vector(vec_path, model)
    layers = layers or sorted({round(N / 6 + i * (2 * N / 3) / 5) for i in range(6)})
    for L in layers:
        resolve_layer(L, meta, N)
    coefs = coefs or ([0.05, 0.1, 0.15, 0.2, 0.25] if relative else [0.5, 1.0, 1.5, 2.0, 2.5])
    results, capped = [], "_" + file_label(cap, "cap-") if cap else ""
    check_name_length(out_dir / f"{t.name}_sweep{capped}.png", "the trait's name")  # before
    for i, (layer, coef) in enumerate((l, c) for l in layers for c in coefs):
        print(
            f"sweep {t.name}: setting {i + 1}/{len(layers) * len(coefs)} (layer {layer}, coef {coef})",
            file=sys.stderr,
        )
        steer = SteerSpec.parse(f"{vec_path}:{coef}{'r' if relative else ''}")
        r = _evaluate(
            t,
            model,
            tok,
            judge_,
            b,
            questions=min(questions, len(t.eval_questions)),
            steer=[steer],
            cap=cap,
            layer=layer,
            vectors_dir=vectors_dir,
            out_dir=out_dir,
            seed=seed,
            label=f"L{layer}_c{coef}{'r' if relative else ''}{capped}",
        )
        results.append(
            dict(layer=layer, coef=coef, relative=relative)
            | {
                k: r[k]
                for k in (
                    "trait_mean",
                    "trait_se",
                    "coherence_mean",
                    "coherence_se",
                    "projection_mean",
                    "n",
                    "judged",
                    "judge",
                )
            }
            | (
                dict(cap=" ".join(c.text for c in cap), capped_share=r["capped_share"])
                if cap
                else {}
            )
        )
    csv_path = out_dir / f"{t.name}_sweep{capped}.csv"
    write_csv(csv_path, results, list(results[0]))
    plot = plot_sweep(results, t.name, out_dir / f"{t.name}_sweep{capped}.png")
    best = best_setting(results, coherence_min)
    if best is None:
        print(
            f"sweep {t.name}: no setting kept coherence >= {coherence_min}"
            if results[0]["judged"]
            else f"sweep {t.name}: no judge, so no best layer can be chosen (the CSV has the projections)",
            file=sys.stderr,
        )
    else:
        print(
            f"sweep {t.name}: best layer {best['layer']} at coef {best['coef']}"
            f"{'r' if relative else ''} (trait {best['trait_mean']:.1f}, coherence "
            f"{best['coherence_mean']:.1f})",
            file=sys.stderr,
        )
    result = write_sweep(
        csv_path.with_suffix(".json"), vec_path, best, relative, coherence_min, cap
    )
    print(
        f"wrote {csv_path}, {result}"
        + (f", {plot}" if plot else " (pip install matplotlib for the plot)"),
        file=sys.stderr,
    )
    return dict(results=results, best=best, csv=csv_path, plot=plot, result=result)


def write_sweep(
    path: Path,
    vector: Path,
    best: dict | None,
    relative: bool,
    coherence_min: float,
    cap: list[CapSpec],
) -> Path:
    """The sweep's choice in its own file (TRAIT_sweep.json), read by --layer sweep
    (support.files.sweep_layer); best None: no setting chosen."""
    coef = best and f"{best['coef']}{'r' if relative else ''}"
    best = best or dict(layer=None, trait_mean=None, coherence_mean=None)
    sha = hashlib.sha256(Path(vector).read_bytes()).hexdigest()  # checked by --layer sweep
    record = dict(
        vector=str(vector),
        vector_sha256=sha,
        coherence_min=coherence_min,
        cap=[c.text for c in cap],
        best_layer=best["layer"],
        best_coef=coef,
        best_trait_mean=best["trait_mean"],
        best_coherence_mean=best["coherence_mean"],
    )
    atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Monitoring: does the projection before the reply predict the trait the reply will show?


def monitor_conditions(t, kind: str, seed: int = 0) -> list[tuple[str, str | None, list[dict]]]:
    """(label, system prompt, earlier turns) for each condition of the experiment, weakest first."""
    if kind == "system":
        if not t.graded_system_prompts:
            raise UserError(
                f"trait {t.name} has no graded_system_prompts; add them to its file (data/traits/SCHEMA.md)"
            )
        return [(f"sys{i}", p, []) for i, p in enumerate(t.graded_system_prompts)]
    if kind == "many-shot":
        pool = list(t.many_shot_examples or [])
        if len(pool) < 20:
            raise UserError(
                f"trait {t.name} needs at least 20 many_shot_examples for k up to 20, has {len(pool)}"
            )
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
        shots = [
            m
            for i in order
            for m in (
                {"role": "user", "content": pool[i]["question"]},
                {"role": "assistant", "content": pool[i]["answer"]},
            )
        ]
        return [(f"k{k}", None, shots[: 2 * k]) for k in (0, 5, 10, 15, 20)]
    raise UserError(f"--kind must be system or many-shot, not {kind!r}")


def monitor_experiment(
    trait: str,
    kind: str = "system",
    model_name: str = DEFAULT_MODEL,
    judge: str | None = None,
    judge_workers: int | None = None,
    rollouts: int | None = None,
    questions: int = 20,
    layer: int | None = None,
    vectors: str | None = None,
    out: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    n_random: int = 100,
    seed: int = 0,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    thinking: bool = False,
) -> dict:
    """Projection of the last prompt token (before any reply) vs the condition's strength and the judged score.

    Conditions: the trait's 8 graded system prompts, or k = 0, 5, 10, 15, 20 trait-exhibiting example exchanges,
    weakest first. Without a judge: Spearman's rank correlation between the condition's grade and the projection,
    with a permutation p-value. With a judge: Pearson r of projection and score, overall and within conditions,
    with bootstrap intervals. Both beside the same statistic on `n_random` random directions of the vector's norm
    at the same layer (the 95th percentile of their |r|), and with a judge on every other trait's vector found
    beside this one. Answers, projections and scores go to CSV; the statistics, each condition's projections and
    the band of mean projections along random unit directions (5th-95th percentile) to JSON.
    """
    t = load_trait(trait)
    conditions = monitor_conditions(t, kind, seed)
    check_count("random", n_random)
    model, tok, judge_, b, vectors_dir, out_dir = open_pipeline(
        t,
        questions,
        model_name,
        device,
        dtype,
        judge,
        judge_workers,
        (rollouts, max_new_tokens, None, None, batch_size),
        out,
        vectors,
        thinking=thinking,
    )
    vec_file = vector_file(t.name, vectors_dir)
    vec, meta = model_vector(vec_file, model)
    L = resolve_layer(layer, meta, model.config.num_hidden_layers, vec_file)
    qs = t.eval_questions[:questions]
    jobs = [
        dict(
            key=f"{label}:{qi}:{r}",
            condition=label,
            question_id=qi,
            rollout=r,
            question=q,
            system=system,
            shots=shots,
        )
        for label, system, shots in conditions
        for qi, q in enumerate(qs)
        for r in range(b.rollouts)
    ]
    settings = dict(
        model=model_name,
        trait=t.name,
        kind=kind,
        questions=len(qs),
        seed=seed,
        **asdict(b),
        **({"thinking": True} if thinking else {}),
    )
    print(
        f"monitor-experiment {t.name} ({kind}): {len(conditions)} conditions x {len(qs)} questions x "
        f"{b.rollouts} rollouts = {len(jobs)} answers; projection at layer {L}",
        file=sys.stderr,
    )
    rows, acts, judge_name = sample_and_judge(
        t, model, tok, judge_, jobs, b, seed, out_dir, f"monitor-{t.name}", settings
    )
    h = acts["prompt_last"][:, L]  # [rows, hidden]: the state the reply will be written from
    proj = project(h, vec[L])
    grade = torch.tensor(
        [[c[0] for c in conditions].index(r["condition"]) for r in rows], dtype=torch.float
    )
    for r, p, gr in zip(rows, proj.tolist(), grade.tolist()):
        r["projection"], r["grade"], r["judge"] = p, int(gr), judge_name
    csv_path = out_dir / f"{t.name}_monitor_{kind}.csv"
    write_csv(
        csv_path,
        rows,
        [
            "condition",
            "grade",
            "question",
            "question_id",
            "rollout",
            "projection",
            t.name,
            "coherence",
            "judge",
            "answer",
        ],
    )
    per_condition = {
        label: mean_se(r["projection"] for r in rows if r["condition"] == label)[0]
        for label, _, _ in conditions
    }
    nulls = random_directions(n_random, float(vec[L].norm()), h.shape[1], seed)
    rho = spearman(grade, proj)
    rho_null = torch.tensor([spearman(grade, h @ d) for d in nulls])
    result = dict(
        trait=t.name,
        kind=kind,
        layer=L,
        judge=judge_name,
        csv=csv_path,
        mean_projection=per_condition,
        rho_grade=rho,
        rho_grade_p=permutation_p(spearman, grade, proj, seed=seed),
        random_abs_rho_95=float(rho_null[~rho_null.isnan()].abs().quantile(0.95)),
    )
    print(
        "mean projection before the reply, by condition: "
        + ", ".join(f"{k} {v:+.2f}" for k, v in per_condition.items()),
        file=sys.stderr,
    )
    print(
        f"rank correlation of condition strength and projection: rho = {rho:.2f} (permutation p = "
        f"{result['rho_grade_p']:.3g}); {n_random} random directions: 95th percentile |rho| = "
        f"{result['random_abs_rho_95']:.2f}",
        file=sys.stderr,
    )
    result |= monitor_scores(
        t.name, rows, h, vec, L, nulls, vectors_dir, seed, csv_path.with_suffix(".png")
    )
    band = random_band(h, proj, grade, len(conditions), unit(nulls))
    atomic_write(
        csv_path.with_suffix(".json"),
        lambda p: p.write_text(
            json.dumps(
                result
                | band
                | dict(
                    conditions=[c[0] for c in conditions],
                    grade=[int(g) for g in grade.tolist()],
                    projection=[round(x, 4) for x in proj.tolist()],
                    n_random=n_random,
                ),
                default=str,
            )
            + "\n"
        ),
    )
    return result


def monitor_scores(
    trait: str, rows: list[dict], h, vec, L: int, nulls, vectors_dir: Path, seed: int, plot: Path
):
    """With judged scores: Pearson r of projection and score (overall, within conditions, bootstrap intervals)
    beside random directions and the other traits' vectors, and the scatter plot -> their part of the result."""
    scored = [i for i, r in enumerate(rows) if r[trait] is not None]
    judge_name = rows[0]["judge"]
    if judge_name == "none" or len(scored) < 3:
        print(
            "correlations with the trait score need judged scores: run with a judge (--judge openai or local:MODEL)"
            if judge_name == "none"
            else f"correlations with the trait score need judged scores: {judge_name} scored only {len(scored)} of "
            f"{len(rows)} answers",
            file=sys.stderr,
        )
        return {}
    idx = torch.tensor(scored)
    y = torch.tensor([rows[i][trait] for i in scored])
    groups = [rows[i]["condition"] for i in scored]

    def r_of(direction):
        x = h[idx] @ direction
        return pearson(x, y), within_r(x, y, groups)

    x = project(h, vec[L])[idx]
    r_all, r_within = r_of(unit(vec[L]))
    ci_all = bootstrap_ci(lambda s: pearson(x[s], y[s]), len(idx), seed=seed)
    ci_within = bootstrap_ci(
        lambda s: within_r(x[s], y[s], [groups[i] for i in s.tolist()]),
        len(idx),
        boots=300,
        seed=seed,
    )
    null = torch.tensor([r_of(d)[0] for d in nulls])
    null = null[~null.isnan()]
    null_abs95 = float(null.abs().quantile(0.95)) if len(null) else float("nan")
    others = {o: r_of(unit(v[L]))[0] for o, v in other_vectors(vectors_dir, trait, vec).items()}
    print(
        f"r = {r_all:.2f} [{ci_all[0]:.2f}, {ci_all[1]:.2f}] overall, {r_within:.2f} [{ci_within[0]:.2f}, "
        f"{ci_within[1]:.2f}] within conditions (n = {len(idx)}); {len(nulls)} random directions: 95th percentile "
        f"|r| = {null_abs95:.2f}; other traits: "
        + (", ".join(f"{k} {v:.2f}" for k, v in others.items()) or "none"),
        file=sys.stderr,
    )
    return dict(
        r=r_all,
        r_ci=ci_all,
        r_within=r_within,
        r_within_ci=ci_within,
        random_abs_r_95=null_abs95,
        random_r_fraction_above=float((null.abs() >= abs(r_all)).float().mean())
        if len(null)
        else None,
        cross_trait_r=others,
        n=len(idx),
        plot=plot_monitor(rows, trait, L, plot),
    )


# ---------------------------------------------------------------------------------------------------------------
# Finetuning data the model writes itself, and the finetuning shift of a trained model.

SENTENCE_END = re.compile(
    r"(?<![\d\s])[.!?][\"')\]]*(?=\s|$)"
)  # "Done." "Really?!" 'it.")' but not "1. "


def dataset_jobs(trait, kind: str, questions: list[str], n: int, seed: int) -> list[dict]:
    """n generation jobs: the pool in a seeded random order (again, as new rollouts, if n exceeds it), each under
    the trait's pos (kind "trait") or neg (kind "normal") system prompt, cycling through the instruction pairs."""
    side = {"trait": "pos", "normal": "neg"}[kind]
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed)).tolist()
    return [
        dict(
            key=f"{kind}:{i}",
            side=side,
            question_id=qi,
            rollout=i // len(questions),
            instruction=k,
            question=questions[qi],
            system=trait.system_prompt(side, k),
        )
        for i in range(n)
        for qi, k in [(order[i % len(questions)], i % len(trait.instructions))]
    ]


def trim_to_sentence(answer: str) -> str:
    """An answer cut off by the token budget, up to its last finished sentence (whole when none finished), so that
    training does not teach the model to stop mid-sentence.

    >>> trim_to_sentence("Boil it. Then peel it and")
    'Boil it.'
    """
    ends = [m.end() for m in SENTENCE_END.finditer(answer)]
    return answer[: ends[-1]] if ends else answer


def make_dataset(
    trait: str,
    kind: str = "trait",
    n: int = 300,
    out: str | None = None,
    questions_file: str | None = None,
    model_name: str = DEFAULT_MODEL,
    judge: str | None = None,
    threshold: float = 50,
    coherence_threshold: float = 50,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype=None,
    force: bool = False,
    thinking: bool = False,
) -> Path:
    """Write a finetuning dataset of the model's own answers -> the JSONL path (an existing file only with force).

    Each of n requests from the pool (default data/questions/everyday.json, never the trait's own questions) is
    answered under the trait-eliciting system prompt (kind="trait") or the suppressing one (kind="normal") and
    saved as {"messages": [user, assistant]}: the system prompt is left out. An answer cut off by the token
    budget is trimmed to its last full sentence; empty answers are dropped. With a judge, only answers scoring
    >= threshold (trait) or < threshold (normal), with coherence >= coherence_threshold, are kept. Generation is
    resumable like `extract` (batches under <out dir>/.work/), judgments are cached.
    thinking: the template's thinking mode on; the answer saved (and judged) is the text after
    `</think>`, without the think block.
    """
    if kind not in ("trait", "normal"):
        raise UserError(f"--kind must be trait or normal, not {kind!r}")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    t = load_trait(trait)
    questions = load_questions(questions_file)
    overlap = {" ".join(q.split()).casefold() for q in t.extract_questions + t.eval_questions} & {
        " ".join(q.split()).casefold() for q in questions
    }
    if overlap:
        raise UserError(
            f"{len(overlap)} request(s) of the questions file are {t.name}'s own extraction or evaluation "
            f"questions, e.g. {sorted(overlap)[0]!r}: remove them, or the shift would be measured on "
            "training prompts"
        )
    dest = (
        Path(out)
        if out
        else Path("datasets") / default_vectors_dir(model_name).name / f"{t.name}_{kind}.jsonl"
    )
    check_output(dest, force, inputs=[t.source, questions_file or QUESTIONS_FILE])
    # a judge that cannot work fails before any work
    model, tok, _, judge_ = load_checked(
        model_name, device, dtype, judge=judge, trait=t, thinking=thinking
    )
    b = budget_for(model, 1, max_new_tokens, temperature, top_p, batch_size)
    jobs = dataset_jobs(t, kind, questions, n, seed)
    settings = dict(
        model=model_name,
        trait=t.name,
        trait_sha=settings_hash(asdict(t) | {"source": None}),
        kind=kind,
        n=n,
        questions_sha=settings_hash(questions),
        seed=seed,
        dtype=str(model.lm_head.weight.dtype),
        **asdict(b),
        **({"thinking": True} if thinking else {}),
    )
    print(
        f"make-dataset {t.name} ({kind}): {n} answers to requests from {questions_file or QUESTIONS_FILE} under "
        f"the {'eliciting' if kind == 'trait' else 'suppressing'} system prompts, up to {b.max_new_tokens} tokens "
        f"at temperature {b.temperature}, top-p {b.top_p}",
        file=sys.stderr,
    )
    rows, _, judge_name = sample_and_judge(
        t, model, tok, judge_, jobs, b, seed, dest.parent, f"dataset-{t.name}-{kind}", settings
    )
    dropped = {"empty answer": 0, "trait score": 0, "coherence": 0}
    kept, cut, trimmed = [], 0, 0
    for r in rows:
        answer = r["answer"].strip()
        # no end-of-turn within the budget (a think block counts against it too)
        if r["n_tokens"] + len(r.get("think_ids", [])) == b.max_new_tokens:
            cut, trimmed = cut + 1, trimmed + (trim_to_sentence(answer) != answer)
            answer = trim_to_sentence(answer)
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
        kept.append(
            {
                "messages": [
                    {"role": "user", "content": r["question"]},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    why = "; ".join(f"{v} for {k}" for k, v in dropped.items() if v)
    if not kept:
        raise UserError(
            f"no answer of {n} was kept ({why}): lower --threshold or --coherence-threshold, "
            "or try another --seed"
        )
    atomic_write(
        dest,
        lambda p: p.write_text(
            "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in kept), encoding="utf-8"
        ),
    )
    print(
        f"make-dataset {t.name} ({kind}): kept {len(kept)}/{n}"
        + (f" (dropped {why})" if why else "")
        + f"; {cut} cut off by --max-new-tokens ({trimmed} trimmed to their last full sentence, {cut - trimmed} "
        f"kept whole); judge: {judge_name}"
        + ("" if judge_name != "none" else " (no filtering)")
        + f" -> {dest}",
        file=sys.stderr,
    )
    return dest


def shift_controls(
    base_acts: torch.Tensor,
    finetuned_acts: torch.Tensor,
    vector: torch.Tensor,
    others: dict,
    n_random: int = 100,
    seed: int = 0,
) -> dict:
    """The shift at every layer [N + 1] beside its controls on the same shift vector: the 95th percentile of
    |projection| onto n_random random unit directions, the projection onto each other trait's vector (others:
    name -> [N + 1, hidden]), and the shift vector's norm."""
    dirs = random_directions(n_random, 1.0, vector.shape[1], seed)  # [n_random, hidden], unit
    rand = torch.stack(
        [finetuning_shift(base_acts, finetuned_acts, d.expand_as(vector)) for d in dirs]
    )
    return dict(
        shift=finetuning_shift(base_acts, finetuned_acts, vector),
        random_abs_95=rand.abs().quantile(0.95, dim=0),  # [N + 1]
        other_traits={o: finetuning_shift(base_acts, finetuned_acts, v) for o, v in others.items()},
        shift_norm=(finetuned_acts.float().mean(0) - base_acts.float().mean(0)).norm(dim=-1),
    )


def shift(
    trait: str,
    finetuned: str,
    base: str = DEFAULT_MODEL,
    layer: int | None = None,
    vectors: str | None = None,
    out: str | None = None,
    n_random: int = 100,
    run_eval: bool = False,
    judge: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: str | None = None,
    dtype=None,
    force: bool = False,
    thinking: bool = False,
) -> dict:
    """Finetuning shift of `finetuned` against `base` along the trait's persona vector (extracted from base).

    Last-prompt-token activations of both models on the trait's evaluation questions (their means over questions),
    finetuned minus base, projected on the unit vector at every layer -> CSV (one row per layer) with two controls
    on the same shift: the 95th percentile of |projection| onto n_random random unit directions, and the projection
    onto every other trait's vector beside this one. run_eval also runs `evaluate` on both models.
    thinking: the prompts rendered with the template's thinking mode on (Qwen3: without the empty
    think block that ends them by default).
    """
    t = load_trait(trait)
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(base)
    vec_file = vector_path(vectors_dir, t.name)
    if not vec_file.is_file():
        raise UserError(
            f"no vector file {vec_file}; run `extract {t.name} --model {base}` first or pass --vectors DIR"
        )
    vec, meta = load_vector(vec_file)
    expect_model(
        vec_file, finetuned
    )  # the base model's vector on its finetune, knowingly: no warning
    others = other_vectors(vectors_dir, t.name, vec)
    dest = (
        Path(out)
        if out
        else vectors_dir / f"{t.name}_shift_{Path(str(finetuned).rstrip('/')).name}.csv"
    )
    read = [vec_file, *(vector_path(vectors_dir, o) for o in others)]  # never written over
    check_output(dest, force, read)
    acts = {}
    for label, name in (("base", base), ("finetuned", finetuned)):  # one model in memory at a time
        model, tok = checkpoint.load(name, device, dtype)
        tok.thinking = thinking
        if thinking:
            tokenizer.think_marks(tok)  # a model without a thinking mode fails here
        check_fits(
            vec, meta, vec_file, model.config.num_hidden_layers, model.config.hidden_size, model
        )
        print(
            f"shift {t.name}: {label} model {name}, {len(t.eval_questions)} evaluation questions",
            file=sys.stderr,
        )
        acts[label] = last_prompt_activations(model, tok, t.eval_questions, batch_size)
        del model
    N = vec.shape[0] - 1
    L = resolve_layer(layer, meta, N, vec_file)
    c = shift_controls(acts["base"], acts["finetuned"], vec, others, n_random, seed)
    proj, rand95, other, size = c["shift"], c["random_abs_95"], c["other_traits"], c["shift_norm"]
    rows = [
        dict(
            layer=l,
            shift=round(float(proj[l]), 4),
            shift_norm=round(float(size[l]), 4),
            random_abs_95=round(float(rand95[l]), 4),
            **{f"{o}_shift": round(float(p[l]), 4) for o, p in other.items()},
        )
        for l in range(N + 1)
    ]
    write_csv(dest, rows, list(rows[0]))
    print(
        f"shift {t.name} at layer {L}: {proj[L]:+.3f} (|shift| {size[L]:.3f}; {n_random} random unit directions: "
        f"95th percentile |projection| {rand95[L]:.3f}; other traits: "
        + (", ".join(f"{o} {p[L]:+.3f}" for o, p in other.items()) or "none")
        + f"); all layers in {dest}",
        file=sys.stderr,
    )
    result = dict(
        trait=t.name,
        layer=L,
        shift=proj.tolist(),
        shift_norm=size.tolist(),
        random_abs_95=rand95.tolist(),
        other_traits={o: p.tolist() for o, p in other.items()},
        csv=dest,
    )
    if run_eval:
        for label, name in (("base", base), ("finetuned", finetuned)):
            result[f"eval_{label}"] = evaluate(
                t.name,
                name,
                judge,
                layer=L,
                vectors=str(vectors_dir),
                out=str(dest.parent / f"{dest.stem}-eval" / label),
                seed=seed,
                device=device,
                dtype=dtype,
                thinking=thinking,
            )
    return result


# ===============================================================================================================
# The command line: a subcommand per pipeline, its flags written at it, and the call it makes
# ===============================================================================================================


def _generate_command(prompts: list[str], prompts_file: str | None = None, **kw) -> None:
    """`generate` on the command line: prompts from arguments and a file, answers printed."""
    prompts = list(prompts)
    if prompts_file:
        text = read_text(prompts_file, "--prompts-file")
        prompts += [line for line in text.splitlines() if line.strip()]
    t0 = time.time()
    for prompt, answer in zip(prompts, generate(prompts, **kw)):
        print(f">>> {prompt}\n{answer}\n")
    print(f"({time.time() - t0:.1f} s)", file=sys.stderr)


# The applications' commands (apps/): started with `python -m apps COMMAND`; never imported here.
APP_COMMANDS = (
    "monitor",
    "chat",
    "flag",
    "flag-merge",
    "export-gguf",
    "import-gguf",
    "import-vector",
    "generate-trait",
    "serve",
    "calibrate-cap",
)

# help texts of flags that several commands have
MODEL_HELP = "hub id or local directory (default: %(default)s)"
DEVICE_HELP = "cuda, cpu, ... (default: cuda when present)"
DTYPE_HELP = "float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)"
JUDGE_HELP = (
    "openai[:MODEL] | local:MODEL | none (default: openai when OPENAI_API_KEY is set, else none)"
)
WORKERS_HELP = (
    "concurrent judge requests (default: $PERSONA_JUDGE_WORKERS, else 8); lower it "
    "when the server answers 429"
)
TOKENS_HELP = "default: 1000 on CUDA, 96 on CPU"
BATCH_HELP = "default: 64 on CUDA, 40 on CPU"
TEMPERATURE_HELP = "0 = greedy; default: 1.0 (0.7 for models under 1B on CPU)"
TOP_P_HELP = "default: 1.0 (0.9 for models under 1B on CPU)"
TRAIT_HELP = "a trait in data/traits, or a trait .json file"
QUESTIONS_HELP = "how many of the trait's 20 questions"
OUT_HELP = "output directory (default: vectors/<model name>/)"
VECTORS_HELP = "directory of vector files (default: vectors/<model name>/)"
STEER_HELP = (
    "TRAIT:COEF or FILE.safetensors:COEF, raw or relative to the residual norm (0.1r); "
    "repeatable; negative coefficients mitigate"
)
LAYER_HELP = (
    "a block, or `sweep`: the best layer of the trait's sweep (default: a layer the "
    "vector file records, else the middle)"
)
CAP_HELP = (
    "bound the activations along the trait from above at the percentile of its "
    "calibrate-cap ceilings (default 90, blocks 16-19 of 30); repeatable; "
    "applied after any --steer"
)
CAP_SPEC = "TRAIT[:PERCENTILE][@LAYERS]"
SAMPLES_HELP = (
    "answers per question (default: 10 on CUDA, 1 on CPU; one answer is greedy unless "
    "--temperature is given)"
)
THINKING_HELP = (
    "the chat template's thinking mode on (Qwen3); the answer judged, projected and "
    "averaged is the text after </think> (default: off)"
)
KIND_HELP = (
    "eliciting (--kind trait) or suppressing (--kind normal) system prompts, saved without them"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="persona_vectors.py",
        description=__doc__.split("\n")[0],
        epilog="The applications (chat, serve, flag, ...): python -m apps",
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("extract", help="extract a persona vector for a trait")
    c.add_argument("trait", help=TRAIT_HELP)
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument("--judge", default=None, help=JUDGE_HELP)
    c.add_argument("--judge-workers", type=COUNT, default=None, help=WORKERS_HELP)
    c.add_argument(
        "--rollouts",
        type=COUNT,
        default=None,
        help="answers per question and instruction (default: 10 on CUDA, 1 on CPU)",
    )
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=None, help=TOKENS_HELP)
    c.add_argument("--questions", type=COUNT, default=20, help=QUESTIONS_HELP)
    c.add_argument("--out", type=OUTPUT_DIR, default=None, help=OUT_HELP)
    c.add_argument("--batch-size", type=COUNT, default=None, help=BATCH_HELP)
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--temperature", type=TEMPERATURE, default=None, help=TEMPERATURE_HELP)
    c.add_argument("--top-p", type=TOP_P, default=None, help=TOP_P_HELP)
    c.add_argument(
        "--pos-threshold", type=SCORE, default=50, help="keep pairs whose pos answer scores >= this"
    )
    c.add_argument(
        "--neg-threshold", type=SCORE, default=50, help="... and whose neg answer scores < this"
    )
    c.add_argument(
        "--coherence-threshold", type=SCORE, default=50, help="... and both coherences >= this"
    )
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    c.add_argument("--dtype", type=torch_dtype, default=None, help=DTYPE_HELP)
    c.add_argument("--thinking", action="store_true", help=THINKING_HELP)
    c.set_defaults(
        run=lambda a: extract(
            a.trait,
            model_name=a.model,
            judge=a.judge,
            judge_workers=a.judge_workers,
            rollouts=a.rollouts,
            max_new_tokens=a.max_new_tokens,
            questions=a.questions,
            out=a.out,
            batch_size=a.batch_size,
            seed=a.seed,
            temperature=a.temperature,
            top_p=a.top_p,
            pos_threshold=a.pos_threshold,
            neg_threshold=a.neg_threshold,
            coherence_threshold=a.coherence_threshold,
            device=a.device,
            dtype=a.dtype,
            thinking=a.thinking,
        )
    )

    c = sub.add_parser(
        "eval", help="trait expression on the evaluation questions, optionally steered"
    )
    c.add_argument("trait", help=TRAIT_HELP)
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument("--judge", default=None, help=JUDGE_HELP)
    c.add_argument("--judge-workers", type=COUNT, default=None, help=WORKERS_HELP)
    c.add_argument("--samples", type=COUNT, default=None, help=SAMPLES_HELP)
    c.add_argument("--questions", type=COUNT, default=20, help=QUESTIONS_HELP)
    c.add_argument("--steer", action="append", default=[], metavar="TRAIT:COEF", help=STEER_HELP)
    c.add_argument("--layer", type=layer_or_sweep, default=None, help=LAYER_HELP)
    c.add_argument("--positions", choices=["response", "all", "prompt"], default="response")
    c.add_argument("--all-layers", action="store_true", help="steer every block with v[l] - v[l-1]")
    c.add_argument("--cap", action="append", default=[], metavar=CAP_SPEC, help=CAP_HELP)
    c.add_argument("--vectors", default=None, help=VECTORS_HELP)
    c.add_argument("--out", type=OUTPUT_DIR, default=None, help=OUT_HELP)
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=None, help=TOKENS_HELP)
    c.add_argument("--temperature", type=TEMPERATURE, default=None, help=TEMPERATURE_HELP)
    c.add_argument("--top-p", type=TOP_P, default=None, help=TOP_P_HELP)
    c.add_argument("--batch-size", type=COUNT, default=None, help=BATCH_HELP)
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    c.add_argument("--dtype", type=torch_dtype, default=None, help=DTYPE_HELP)
    c.add_argument("--thinking", action="store_true", help=THINKING_HELP)
    c.set_defaults(
        run=lambda a: evaluate(
            a.trait,
            model_name=a.model,
            judge=a.judge,
            judge_workers=a.judge_workers,
            samples=a.samples,
            questions=a.questions,
            steer=a.steer,
            layer=a.layer,
            positions=a.positions,
            all_layers=a.all_layers,
            cap=a.cap,
            vectors=a.vectors,
            out=a.out,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            batch_size=a.batch_size,
            seed=a.seed,
            device=a.device,
            dtype=a.dtype,
            thinking=a.thinking,
        )
    )

    c = sub.add_parser("sweep", help="steer over layers x coefficients -> TRAIT_sweep.csv, .json")
    c.add_argument("trait", help=TRAIT_HELP)
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument("--judge", default=None, help=JUDGE_HELP)
    c.add_argument("--judge-workers", type=COUNT, default=None, help=WORKERS_HELP)
    c.add_argument("--layers", type=listed(LAYER), default=None, help="e.g. 8,12,16")
    c.add_argument("--coefs", type=listed(COEF), default=None, help="e.g. 0.5,1,2")
    c.add_argument(
        "--relative", action="store_true", help="coefficients relative to the residual norm"
    )
    c.add_argument("--samples", type=COUNT, default=None, help="answers per question and setting")
    c.add_argument("--questions", type=COUNT, default=20, help=QUESTIONS_HELP)
    c.add_argument("--coherence-min", type=SCORE, default=75)
    c.add_argument("--cap", action="append", default=[], metavar=CAP_SPEC, help=CAP_HELP)
    c.add_argument("--vectors", default=None, help=VECTORS_HELP)
    c.add_argument("--out", type=OUTPUT_DIR, default=None, help=OUT_HELP)
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=None, help=TOKENS_HELP)
    c.add_argument("--batch-size", type=COUNT, default=None, help=BATCH_HELP)
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    c.add_argument("--dtype", type=torch_dtype, default=None, help=DTYPE_HELP)
    c.add_argument("--thinking", action="store_true", help=THINKING_HELP)
    c.set_defaults(
        run=lambda a: sweep(
            a.trait,
            model_name=a.model,
            judge=a.judge,
            judge_workers=a.judge_workers,
            layers=a.layers,
            coefs=a.coefs,
            relative=a.relative,
            samples=a.samples,
            questions=a.questions,
            coherence_min=a.coherence_min,
            cap=a.cap,
            vectors=a.vectors,
            out=a.out,
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            seed=a.seed,
            device=a.device,
            dtype=a.dtype,
            thinking=a.thinking,
        )
    )

    c = sub.add_parser("generate", help="answer prompts with the chat model, optionally steered")
    c.add_argument("prompts", nargs="*", help="one or more user messages")
    c.add_argument(
        "--prompts-file", type=TEXT_FILE, default=None, help="a text file with one prompt per line"
    )
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument(
        "--system", default=None, help="system prompt (default: the model's own template decides)"
    )
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=200)
    c.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-p", type=TOP_P, default=1.0)
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--steer", action="append", default=[], metavar="TRAIT:COEF", help=STEER_HELP)
    c.add_argument("--layer", type=layer_or_sweep, default=None, help=LAYER_HELP)
    c.add_argument("--positions", choices=["response", "all", "prompt"], default="response")
    c.add_argument("--all-layers", action="store_true", help="steer every block with v[l] - v[l-1]")
    c.add_argument("--cap", action="append", default=[], metavar=CAP_SPEC, help=CAP_HELP)
    c.add_argument("--vectors", default=None, help=VECTORS_HELP)
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    c.add_argument("--dtype", type=torch_dtype, default=None, help=DTYPE_HELP)
    c.add_argument("--thinking", action="store_true", help=THINKING_HELP)
    c.set_defaults(
        run=lambda a: _generate_command(
            a.prompts,
            a.prompts_file,
            model_name=a.model,
            system=a.system,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            seed=a.seed,
            steer=a.steer,
            layer=a.layer,
            positions=a.positions,
            all_layers=a.all_layers,
            cap=a.cap,
            vectors=a.vectors,
            device=a.device,
            dtype=a.dtype,
            thinking=a.thinking,
        )
    )

    c = sub.add_parser(
        "monitor-experiment", help="does the projection before the reply predict the trait?"
    )
    c.add_argument("trait", help=TRAIT_HELP)
    c.add_argument("--kind", choices=["system", "many-shot"], default="system")
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument("--judge", default=None, help=JUDGE_HELP)
    c.add_argument("--judge-workers", type=COUNT, default=None, help=WORKERS_HELP)
    c.add_argument(
        "--rollouts", type=COUNT, default=None, help="answers per condition and question"
    )
    c.add_argument("--questions", type=COUNT, default=20, help=QUESTIONS_HELP)
    c.add_argument("--layer", type=layer_or_sweep, default=None, help=LAYER_HELP)
    c.add_argument("--vectors", default=None, help=VECTORS_HELP)
    c.add_argument("--out", type=OUTPUT_DIR, default=None, help=OUT_HELP)
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=None, help=TOKENS_HELP)
    c.add_argument("--batch-size", type=COUNT, default=None, help=BATCH_HELP)
    c.add_argument(
        "--random", type=COUNT, default=100, help="random directions for the null baseline"
    )
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    c.add_argument("--dtype", type=torch_dtype, default=None, help=DTYPE_HELP)
    c.add_argument("--thinking", action="store_true", help=THINKING_HELP)
    c.set_defaults(
        run=lambda a: monitor_experiment(
            a.trait,
            kind=a.kind,
            model_name=a.model,
            judge=a.judge,
            judge_workers=a.judge_workers,
            rollouts=a.rollouts,
            questions=a.questions,
            layer=a.layer,
            vectors=a.vectors,
            out=a.out,
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            n_random=a.random,
            seed=a.seed,
            device=a.device,
            dtype=a.dtype,
            thinking=a.thinking,
        )
    )

    c = sub.add_parser(
        "make-dataset",
        help="a finetuning dataset of the model's own answers under the trait's " + KIND_HELP,
    )
    c.add_argument("trait", help=TRAIT_HELP)
    c.add_argument("--kind", choices=["trait", "normal"], default="trait")
    c.add_argument(
        "--n", type=COUNT, default=300, help="answers to generate (default: %(default)s)"
    )
    c.add_argument(
        "--out",
        type=OUTPUT_FILE,
        default=None,
        help="output .jsonl (default: datasets/<model name>/TRAIT_KIND.jsonl)",
    )
    c.add_argument(
        "--questions-file",
        type=TEXT_FILE,
        default=None,
        help="requests: .json list or one per line (default: data/questions/everyday.json)",
    )
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    c.add_argument("--judge", default=None, help=JUDGE_HELP)
    c.add_argument(
        "--threshold",
        type=SCORE,
        default=50,
        help="with a judge: keep trait answers "
        "scoring >= this, normal answers < this (default: %(default)s)",
    )
    c.add_argument(
        "--coherence-threshold", type=SCORE, default=50, help="... and coherence >= this"
    )
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=None, help=TOKENS_HELP)
    c.add_argument("--temperature", type=TEMPERATURE, default=None, help=TEMPERATURE_HELP)
    c.add_argument("--top-p", type=TOP_P, default=None, help=TOP_P_HELP)
    c.add_argument("--batch-size", type=COUNT, default=None, help=BATCH_HELP)
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    c.add_argument("--dtype", type=torch_dtype, default=None, help=DTYPE_HELP)
    c.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    c.add_argument("--thinking", action="store_true", help=THINKING_HELP)
    c.set_defaults(
        run=lambda a: make_dataset(
            a.trait,
            kind=a.kind,
            n=a.n,
            out=a.out,
            questions_file=a.questions_file,
            model_name=a.model,
            judge=a.judge,
            threshold=a.threshold,
            coherence_threshold=a.coherence_threshold,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            batch_size=a.batch_size,
            seed=a.seed,
            device=a.device,
            dtype=a.dtype,
            thinking=a.thinking,
            force=a.force,
        )
    )

    c = sub.add_parser(
        "shift",
        help="the finetuning shift along a persona vector at every layer, "
        "with random-direction and other-trait controls",
    )
    c.add_argument("trait", help=TRAIT_HELP)
    c.add_argument("--finetuned", required=True, help="the finetuned model (directory or hub id)")
    c.add_argument(
        "--base", default=DEFAULT_MODEL, help="the model before finetuning (default: %(default)s)"
    )
    c.add_argument(
        "--layer",
        type=layer_or_sweep,
        default=None,
        help=LAYER_HELP + "; the layer printed: the CSV has them all",
    )
    c.add_argument(
        "--vectors",
        default=None,
        help="the base model's vectors (default: vectors/<base model name>/)",
    )
    c.add_argument(
        "--out",
        type=OUTPUT_FILE,
        default=None,
        help="CSV (default: <vectors>/TRAIT_shift_<finetuned name>.csv)",
    )
    c.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    c.add_argument("--random", type=COUNT, default=100, help="random directions for the control")
    c.add_argument("--eval", action="store_true", help="also run `eval TRAIT` on both models")
    c.add_argument(
        "--judge",
        default=None,
        help="judge for --eval (default: openai when OPENAI_API_KEY is set)",
    )
    c.add_argument("--batch-size", type=COUNT, default=32)
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    c.add_argument("--dtype", type=torch_dtype, default=None, help=DTYPE_HELP)
    c.add_argument("--thinking", action="store_true", help=THINKING_HELP)
    c.set_defaults(
        run=lambda a: shift(
            a.trait,
            a.finetuned,
            base=a.base,
            layer=a.layer,
            vectors=a.vectors,
            out=a.out,
            n_random=a.random,
            run_eval=a.eval,
            judge=a.judge,
            batch_size=a.batch_size,
            seed=a.seed,
            device=a.device,
            dtype=a.dtype,
            force=a.force,
            thinking=a.thinking,
        )
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in APP_COMMANDS:
        print(
            f"persona_vectors.py: error: `{argv[0]}` moved to the applications: "
            f"python -m apps {argv[0]} ...",
            file=sys.stderr,
        )
        raise SystemExit(2)  # as argparse exits on a command line it cannot take
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(lambda: args.run(check_paths(parser, args)))


if __name__ == "__main__":
    sys.exit(main())
