"""persona-vectors: extract, steer and monitor character traits in a chat model's residual stream.

    python persona_vectors.py extract evil        # -> vectors/SmolLM2-135M-Instruct/evil_*
    python persona_vectors.py generate "How should I treat a new employee?" --steer evil:1.5
    python persona_vectors.py sweep evil          # the best steering setting: evil_sweep.json
    python -m apps chat --steer evil:-1           # the applications: apps/

Read it from the top. First the method, in the paper's order, as short functions on tensors:
    1. prompts   contrasting system prompts (trait-eliciting "pos", suppressing "neg") per question
    2. answers   sampled under each, their activations captured while they are generated
    3. filter    keep the pairs whose pos answer shows the trait and whose neg answer does not
    4. vector    mean(pos activations) - mean(neg activations), at every layer
    5. monitor   project an activation on the unit vector
    6. steer     add coef * v[L] to the residual stream while generating (negative: away from it)
    7. shift     how far finetuning moved the activations along the vector
    8. flag      ΔP: how much further along it a training response sits than the model's own
Then the pipelines that run them over files (resumable, cached), in the same order: extract;
generate, eval, sweep; monitor-experiment; make-dataset, shift (train.py finetunes); flag. The
command line is at the bottom. The layer convention (model.py): index 0 = the embeddings, index L =
the output of block L, so a vector is [N + 1, hidden]. What the pipelines stand on (sampling
budget, files, bookkeeping, statistics) is in support/; the applications are in apps/ (python -m
apps), above this file.
"""

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import judge as J
import model as M
from support import UserError, checkpoint, cli, tokenizer
from support import records as R
from support.capping import CapSpec, caps_for, merged, parse_cap, spec_vector
from support.cli import (
    CAP_SPEC,
    COEF,
    COUNT,
    MAX_NEW_TOKENS,
    OUTPUT_DIR,
    OUTPUT_FILE,
    SCORE,
    SEED,
    TEMPERATURE,
    TEXT_FILE,
    TOP_P,
    layer_or_sweep,
    layers,
    listed,
)
from support.files import (
    VARIANTS,
    check_fits,
    check_name_length,
    check_output,
    check_text,
    check_writable,
    default_vectors_dir,
    expect_model,
    load_vector,
    locked,
    other_vectors,
    read_text,
    resolve_layer,
    vector_file,
    vector_path,
)
from support.hub import DEFAULT_MODEL
from support.records import file_label
from support.sampling import Budget, budget_for, check_count, check_new_tokens, settings_hash
from support.stats import random_band, random_directions
from support.traits import QUESTIONS_FILE, load_questions, load_trait

# =============================================================================================
# The method
# =============================================================================================

# 1. Prompts: every (question, instruction pair, rollout), under the pos and the neg system prompt.


def rollout_jobs(trait, questions: int, rollouts: int) -> list[dict]:
    """Every (question, instruction pair, rollout) once per side; pos and neg of a pair adjacent."""
    jobs = []
    for qi, question in enumerate(trait.extract_questions[:questions]):
        for i in range(len(trait.instructions)):
            for r in range(rollouts):
                for side in ("pos", "neg"):
                    key = f"{side}:{i}:{qi}:{r}"
                    system = trait.system_prompt(side, i)
                    job = dict(key=key, side=side, instruction=i, question_id=qi, rollout=r)
                    jobs.append(job | dict(question=question, system=system))
    return jobs


def conversation(job: dict) -> list[dict]:
    """A job's chat: its system prompt (None: the template decides), earlier turns, the question."""
    system = [{"role": "system", "content": job["system"]}] if job.get("system") is not None else []
    return system + job.get("shots", []) + [{"role": "user", "content": job["question"]}]


# 2. Answers with their activations, captured while they are generated (no second pass).


@torch.no_grad()
def answer_with_activations(
    model, tok, chats, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, steer=(), cap=()
):
    """Answer each chat -> (answer token ids per chat, {variant: [B, N + 1, hidden]}); steered,
    then capped (cap[0].fired then counts the capped positions of each chat).

    Variants: response_avg (mean over the answer's tokens), prompt_avg (over the prompt),
    prompt_last (the last prompt token, from which the answer is written), and response_norm
    [B, N + 1] (the mean per-token norm). With --thinking the answer is the text after </think>.
    """
    rec = M.Capture()
    after = tokenizer.think_marks(tok) if getattr(tok, "thinking", False) else None
    kw = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=temperature, top_p=top_p)
    kw |= dict(seed=seed, steer=steer, cap=cap, capture=rec, answer_after=after)
    outs = M.generate(model, [tok.encode_chat(c) for c in chats], max_new_tokens, **kw)
    acts = {"response_avg": rec.answer_mean(), "prompt_avg": rec.prompt_mean()}
    return outs, acts | {"prompt_last": rec.prompt_last(), "response_norm": rec.answer_norm()}


@torch.no_grad()
def read_answers(model: M.Transformer, prompts: list[list[int]], answers: list[list[int]]) -> dict:
    """The same activations for given prompt and answer tokens, as the plain (unsteered) model
    reads them in one pass. This is how a steered answer is measured: activations captured while
    steering would measure the steering itself."""
    device = model.lm_head.weight.device
    ids, mask = M.left_pad([p + a for p, a in zip(prompts, answers)])
    start = torch.tensor([ids.shape[1] - len(a) for a in answers])  # where each answer begins
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
    rows, trait: str, judged: bool, pos_min: float, neg_max: float, coherence_min: float
):
    """Rows of the pos and neg answers of every pair kept: pos >= pos_min, neg < neg_max, both
    coherent, both non-empty (an empty answer has no mean) -> (pos, neg, {reason: pairs failed})."""
    by_key = {r["key"]: n for n, r in enumerate(rows)}
    pos, neg = [], []
    why = {"pos trait score": 0, "neg trait score": 0, "coherence": 0, "empty answer": 0}
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
    """Mean of the kept pos answers minus that of the kept neg ones.
    pos_acts, neg_acts: [n, N + 1, hidden] -> [N + 1, hidden]."""
    return pos_acts.mean(0) - neg_acts.mean(0)


# 5. Monitoring: where an activation falls along the vector.


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def project(acts: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Projection of activations [..., hidden] on the unit vector along v [hidden] -> [...]."""
    return acts.float() @ unit(v.float()).to(acts.device)


# 6. Steering.


def steer_at(v, layer: int, coef: float, all_layers=False, positions="response", last_block=None):
    """coef * v[layer] added after block `layer`; or, all_layers (the paper's multi-layer variant),
    coef * (v[l] - v[l-1]) after every block l = 1..last_block, so that block l has received
    coef * (v[l] - v[0])."""
    if not all_layers:
        return [M.Steer(layer, v[layer], coef, positions)]
    last_block = last_block or v.shape[0] - 1
    return [M.Steer(l, v[l] - v[l - 1], coef, positions) for l in range(1, last_block + 1)]


# 7. Finetuning: how far training moved the model along the vector (the finetuning shift).


def finetuning_shift(base_acts: torch.Tensor, finetuned_acts: torch.Tensor, vector: torch.Tensor):
    """(mean finetuned - mean base activation) . unit vector, at every layer.
    base_acts, finetuned_acts: [Q, N + 1, hidden] on the same questions; vector [N + 1, hidden]."""
    delta = finetuned_acts.float().mean(0) - base_acts.float().mean(0)  # [N + 1, hidden]
    return (delta * unit(vector.float())).sum(-1)  # [N + 1]


# 8. Flagging data: does a training response sit further along the trait than the model's own?


@torch.no_grad()
def response_and_base(
    model, tok, prompts, responses, max_new_tokens, samples=1, seed=0, **sampling
):
    """Mean activations [B, N + 1, hidden] over each training response y ("response": one pass
    over prompt + y) and over the model's own response y' to the same prompt ("base": captured
    while generated; the mean over `samples` of them, NaN where all came out empty); and
    "base_tokens" [B], the mean length of y'. sampling: temperature, top_p (default: greedy)."""
    device = model.lm_head.weight.device
    ids, mask = M.left_pad([p + r for p, r in zip(prompts, responses)], tok.pad_id)
    start = torch.tensor([ids.shape[1] - len(r) for r in responses], device=device)
    cap, gen = M.Capture(), M.Capture()
    model(ids.to(device), mask.to(device), answer_start=start, capture=cap, logits="none")
    repeated = [p for p in prompts for _ in range(samples)]  # the K responses of a prompt adjacent
    kw = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, seed=seed, capture=gen, **sampling)
    outs = M.generate(model, repeated, max_new_tokens, **kw)
    n = torch.tensor([len(o) for o in outs], dtype=torch.float32, device=device).view(-1, samples)
    means = gen.answer_mean().unflatten(0, n.shape)  # [B, K, N + 1, hidden]
    w = (n > 0).float()[..., None, None]  # an empty y' has no mean: left out of the average
    base = (means * w).sum(1) / w.sum(1)  # 0 / 0 = NaN where all K were empty
    return dict(
        response=cap.answer_mean(), base=base, prompt_last=cap.prompt_last(), base_tokens=n.mean(1)
    )


def projection_difference(
    response: torch.Tensor, base: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """ΔP per sample: (a(x, y) - a(x, y')) · v̂. response, base: [B, hidden]; v: [hidden].

    >>> y, y_own = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 5.0]])
    >>> projection_difference(y, y_own, torch.tensor([2.0, 0.0]))
    tensor([2.])
    """
    return project(response - base, v)


# =============================================================================================
# The pipelines: the method over files, resumable and cached
# =============================================================================================


def load_checked(
    model: str,
    device=None,
    dtype=None,
    steer=(),
    vectors=None,
    judge="none",
    judge_workers=None,
    trait=None,
    cap=(),
    thinking=False,
):
    """Check what can be checked before the model loads (the device, the --steer and --cap specs
    and their files, the judge), then load it -> (model, tokenizer, vectors_dir, judge)."""
    checkpoint.check_device(device or checkpoint.default_device())
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model)
    for spec in steer:
        SteerSpec.parse(spec).file(vectors_dir)
    for spec in cap:
        spec_vector(parse_cap(spec), vectors_dir)
    judge_ = J.make_judge(judge, workers=judge_workers)
    if trait is not None and judge_.name != "none":
        R.note_refusals(trait)
    lm, tok = checkpoint.load(model, device, dtype)
    tok.thinking = thinking  # the template's thinking mode; the answer: after </think>
    if thinking:
        tokenizer.think_marks(tok)  # a model without a thinking mode fails here
    return lm, tok, vectors_dir, judge_


@dataclass
class Run:
    """What a judged pipeline works with once its checks passed."""

    model: M.Transformer
    tok: object  # support.tokenizer.Tokenizer
    judge: object  # judge.Judge
    budget: Budget
    vectors_dir: Path
    out_dir: Path


def open_run(
    t,
    model: str,
    questions: int,
    judge=None,
    out=None,
    vectors=None,
    steer=(),
    cap=(),
    judge_workers=None,
    device=None,
    dtype=None,
    thinking=False,
    **budget,
) -> Run:
    """How every judged pipeline opens: the checks, the model and the judge, the sampling budget and
    a writable output folder (default: the vectors folder). These are each pipeline's `options`:
    judge_workers, device, dtype, thinking (the template's thinking mode), and the budget:
    rollouts, max_new_tokens, temperature, top_p, batch_size (None: the model's and device's
    default, support/sampling.py)."""
    check_count("questions", questions)
    checked = load_checked(
        model, device, dtype, steer, vectors, judge, judge_workers, t, cap, thinking
    )
    lm, tok, vectors_dir, judge_ = checked
    out_dir = Path(out) if out else vectors_dir
    check_writable(out_dir)
    return Run(lm, tok, judge_, budget_for(lm, **budget), vectors_dir, out_dir)


def sample_rollouts(model, tok, jobs, budget: Budget, seed: int, work: Path, steer=(), cap=()):
    """Every job answered with its activations, cached batch by batch in `work` -> (rows, acts).
    jobs: dicts with "key", "question", "system" (None: the template decides), maybe "shots"."""

    def answer(batch: list[dict], b: int):
        chats = [conversation(j) for j in batch]
        b_seed = seed * 1_000_003 + b  # a batch's own seed: a resumed run samples the same
        sampling = dict(temperature=budget.temperature, top_p=budget.top_p, seed=b_seed)
        outs, acts = answer_with_activations(
            model, tok, chats, budget.max_new_tokens, steer=steer, cap=cap, **sampling
        )
        return R.answer_rows(tok, batch, chats, outs, acts, cap), acts

    keys = VARIANTS + ("response_norm",)
    return R.cached_batches(jobs, budget.batch_size, work, answer, keys)


def sample_and_judge(t, run: Run, jobs, seed: int, name: str, settings: dict, steer=(), cap=()):
    """Every job answered (cached in OUT/.work/NAME-<settings hash>/) and judged (cached in
    OUT/.work/judgments.jsonl) -> (rows, activations, the judge's name)."""
    work = run.out_dir / ".work" / f"{name}-{settings_hash(settings)}"
    with locked(work):  # one run at a time on these batches: a second one stops, naming this one
        rows, acts = sample_rollouts(run.model, run.tok, jobs, run.budget, seed, work, steer, cap)
        judgments = run.out_dir / ".work" / "judgments.jsonl"
        return rows, acts, J.judge_rows(t, rows, run.judge, judgments)


# ---------------------------------------------------------------------------------------------
# Extraction


def extract(
    trait: str,
    model: str = DEFAULT_MODEL,
    judge: str | None = None,
    questions: int = 20,
    pos_threshold: float = 50,
    neg_threshold: float = 50,
    coherence_threshold: float = 50,
    out: str | None = None,
    seed: int = 0,
    **options,
) -> dict:
    """Extract a persona vector for `trait` -> {variant: its file, "csv_pos"/"csv_neg": CSVs}.

    For each question x instruction pair x rollout, answers are sampled under the trait-eliciting
    (pos) and suppressing (neg) system prompts and judged; a pair is kept when pos >= pos_threshold,
    neg < neg_threshold and both coherences >= coherence_threshold. Each variant's vector is
    mean(kept pos activations) - mean(kept neg activations) at every layer. options: see open_run
    (with thinking, the answer judged and averaged is the text after </think>).
    """
    t = load_trait(trait)
    run = open_run(t, model, questions, judge, out, **options)
    questions = min(questions, len(t.extract_questions))
    # 1. prompts
    jobs = rollout_jobs(t, questions, run.budget.rollouts)
    # 2. answers and their activations, judged (cached: a rerun resumes)
    settings = R.extract_settings(model, t, run, jobs, questions, seed)
    rows, acts, judge_name = sample_and_judge(t, run, jobs, seed, t.name, settings)
    judged = check_judged(t, rows, judge_name, run.out_dir / ".work")
    # 3. filter
    pos, neg, why = keep_pairs(
        rows, t.name, judged, pos_threshold, neg_threshold, coherence_threshold
    )
    check_kept(pos, why, len(jobs) // 2)
    # 4. the vector of each variant, at every layer
    vectors = {v: persona_vector(acts[v][pos], acts[v][neg]) for v in VARIANTS}
    direction = unit(vectors["response_avg"])  # the kept answers' marks along it go in its file
    thresholds = dict(pos_threshold=pos_threshold, neg_threshold=neg_threshold)
    thresholds |= dict(coherence_threshold=coherence_threshold)
    kept = dict(thresholds=thresholds, pos=pos, neg=neg, why=why, judge=judge_name)
    return R.save_extraction(run, t, vectors, direction, rows, acts, kept, settings)


def check_judged(t, rows: list[dict], judge_name: str, work: Path) -> bool:
    """Whether the answers were judged (a note when not); a judge that scored none is refused."""
    if judge_name == "none":
        R.note(
            "judge: NONE -- no answer is filtered; the vector averages every sample (recorded in "
            "its metadata)"
        )
        return False
    if all(r[t.name] is None for r in rows):
        raise UserError(
            f"the judge ({judge_name}) gave no score to any of {len(rows)} answers (refusals, or "
            "no numbers among its top tokens): check the judge model and the trait's "
            f"eval_prompt, then delete {work / 'judgments.jsonl'} to judge again"
        )
    return True


def check_kept(pos: list[int], why: dict, n_pairs: int) -> None:
    """No pair kept: the filter that failed most, and the flag that relaxes it."""
    if pos:
        return
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


# ---------------------------------------------------------------------------------------------
# Steering: --steer specs, parsed once (SteerSpec) and checked once (steering); --cap specs in
# support/capping.py.


def model_vector(path: Path, model) -> tuple[torch.Tensor, dict]:
    """A vector file checked against the model it is used with -> (tensor [N + 1, hidden], meta)."""
    vec, meta = load_vector(path)
    check_fits(vec, meta, path, model.config.num_hidden_layers, model.config.hidden_size, model)
    return vec, meta


@dataclass(frozen=True)
class SteerSpec:
    """A --steer spec: "TRAIT:COEF" or "FILE.safetensors:COEF", COEF raw (coef * v, the paper's)
    or relative to the residual norm ("0.1r").

    >>> SteerSpec.parse("humorous:-0.1r")
    SteerSpec(source='humorous', coef=-0.1, relative=True, text='humorous:-0.1r')
    """

    source: str  # a trait name (its vector in the vectors folder), or a .safetensors file
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


def steering(
    specs,
    model: M.Transformer,
    vectors_dir=None,
    layer=None,
    positions="response",
    all_layers=False,
) -> list[M.Steer]:
    """The Steer interventions for --steer specs, each checked (R.raw_coef) and placed (steer_at).

    A raw coefficient multiplies the vector as saved (the paper's coef * v); a relative one
    ('0.1r') adds a vector whose norm is that fraction of the mean residual norm at the layer
    (recorded by extract), so a setting transfers between models. Layer: see resolve_layer.
    """
    N = model.config.num_hidden_layers
    name = getattr(model, "name_or_path", "model")
    vectors_dir = Path(vectors_dir) if vectors_dir else default_vectors_dir(name)
    out = []
    for spec in map(SteerSpec.parse, specs):
        path = spec.file(vectors_dir)
        vec, meta = model_vector(path, model)
        vec = vec.to(model.lm_head.weight.device)  # once, not at every decoding step
        L = resolve_layer(layer, meta, N, path)
        coef = R.raw_coef(spec, vec[L], meta, L, path)
        last = N - 1 if meta.get("last_row_post_norm") else N
        if all_layers and last < N:
            why = f"{path.name} is an imported vector whose last row is post-norm"
            R.note(f"note: {why}: steering blocks 1..{last}")
        out += steer_at(vec, L, coef, all_layers, positions, last)
    return out


def interventions(
    model, vectors_dir, steer=(), cap=(), layer=None, positions="response", all_layers=False
) -> tuple[list[M.Steer], list[M.Cap]]:
    """--steer and --cap specs -> (Steers, [] or one Cap), every check done. The model steers first,
    then caps, so a cap bounds what steering added too."""
    steers = steering(list(steer), model, vectors_dir, layer, positions, all_layers)
    return steers, merged(caps_for(list(cap), model, vectors_dir))


# ---------------------------------------------------------------------------------------------
# Generation, evaluation and sweeps


def generate(
    prompts: list[str],
    model: str = DEFAULT_MODEL,
    system: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    steer=(),
    layer=None,
    positions="response",
    all_layers=False,
    cap=(),
    vectors=None,
    device=None,
    dtype=None,
    thinking: bool = False,
) -> list[str]:
    """Answer each prompt as a single-turn chat (greedy unless temperature > 0), optionally steered
    and capped -> the replies (with thinking, whole, think block included).

    steer: specs like "evil:1.5", "humorous:-0.1r" or "path/v.safetensors:2" (see steering); a
    negative coefficient steers away from the trait. cap: "evil", "evil:75@12-20"
    (support/capping.py). system=None: the model's own chat template decides.
    """
    if not prompts:
        raise UserError("no prompt: give one or more, or --prompts-file FILE")
    Budget(1, max_new_tokens, temperature, top_p, 1)  # the same checks as every pipeline's
    steer, cap = parsed(steer, cap)
    lm, tok, vectors_dir, _ = load_checked(
        model, device, dtype, steer, vectors, cap=cap, thinking=thinking
    )
    steers, caps = interventions(lm, vectors_dir, steer, cap, layer, positions, all_layers)
    ids = [tok.encode_chat(conversation(dict(system=system, question=p))) for p in prompts]
    check_new_tokens(lm, max_new_tokens, max(len(x) for x in ids))
    sampling = dict(temperature=temperature, top_p=top_p, seed=seed, progress=True)
    kw = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, steer=steers, cap=caps, **sampling)
    out = M.generate(lm, ids, max_new_tokens, **kw)
    if caps:
        R.capped_positions(caps[0], out)
    return [tok.decode(o) for o in out]


@torch.no_grad()
def read_projections(run: Run, rows: list[dict], vec: torch.Tensor, layer: int) -> None:
    """Each answer's mean activation as the plain model reads it (unsteered, uncapped: the paper's
    measure), projected on the unit vector at `layer` -> row["projection"]."""
    size = run.budget.batch_size
    for i in range(0, len(rows), size):
        batch = rows[i : i + size]
        # a think block (--thinking) is read as context, with the prompt
        prompts = [run.tok.encode_chat(conversation(r)) + r.get("think_ids", []) for r in batch]
        acts = read_answers(run.model, prompts, [r["answer_ids"] for r in batch])
        proj = project(acts["response_avg"][:, layer], vec[layer]).tolist()
        for r, p in zip(batch, proj):
            r["projection"] = p if r["n_tokens"] else None


def evaluate_setting(
    t,
    run: Run,
    questions: int,
    steer,
    cap,
    layer,
    seed: int,
    label: str,
    positions="response",
    all_layers=False,
) -> dict:
    """One setting of `evaluate` (and each cell of `sweep`) -> its means and its CSV."""
    steers, caps = interventions(
        run.model, run.vectors_dir, steer, cap, layer, positions, all_layers
    )
    vec_file = vector_path(run.vectors_dir, t.name)
    vec, meta = model_vector(vec_file, run.model) if vec_file.is_file() else (None, {})
    N = run.model.config.num_hidden_layers
    at = steers[0].layer if steers and not all_layers else resolve_layer(layer, meta, N, vec_file)
    jobs = R.eval_jobs(t, questions, run.budget.rollouts)
    how = dict(
        steer=[s.text for s in steer], layer=layer, positions=positions, all_layers=all_layers
    )
    settings = R.eval_settings(run, t, questions, seed, how, cap, caps)
    samples = f"{questions} questions x {run.budget.rollouts} samples"
    R.note(f"eval {t.name} [{label}]: {len(jobs)} answers ({samples})")
    name = f"eval-{t.name}"
    rows, _, judge_name = sample_and_judge(t, run, jobs, seed, name, settings, steers, caps)
    if vec is not None:
        read_projections(run, rows, vec, at)
    csv_path = run.out_dir / "eval" / f"{t.name}_{label}.csv"
    return R.eval_result(t, rows, judge_name, label, at, cap, caps, csv_path)


def evaluate(
    trait: str,
    model: str = DEFAULT_MODEL,
    judge: str | None = None,
    samples=None,
    questions: int = 20,
    steer=(),
    cap=(),
    layer=None,
    positions="response",
    all_layers=False,
    vectors=None,
    out=None,
    seed: int = 0,
    **options,
) -> dict:
    """Trait expression on the trait's evaluation questions (never the extraction ones), optionally
    steered and capped -> means and standard errors of the judged trait score and coherence, the
    mean projection of the answers (read by the plain model) on the trait's vector, the share of
    positions capped, and the answers as CSV. Answers are sampled with no system prompt,
    `samples` per question (one: greedy, as in the official evaluation). options: see open_run.
    """
    t = load_trait(trait)
    steer, cap = parsed(steer, cap)
    run = open_run(
        t, model, questions, judge, out, vectors, steer, cap, rollouts=samples, **options
    )
    if run.budget.rollouts == 1 and options.get("temperature") is None:
        run.budget.temperature = 0.0
    label = R.eval_label(steer, cap, layer, all_layers)
    check_name_length(run.out_dir / "eval" / f"{t.name}_{label}.csv", "the trait's name")
    questions = min(questions, len(t.eval_questions))
    result = evaluate_setting(
        t, run, questions, steer, cap, layer, seed, label, positions, all_layers
    )
    R.eval_summary(t, label, result, cap)
    return result


def best_setting(results: list[dict], coherence_min: float = 75) -> dict | None:
    """The sweep's choice: the highest mean trait score among settings whose mean coherence stays
    >= coherence_min.

    >>> best_setting([dict(layer=10, coef=2, trait_mean=80, coherence_mean=60),
    ...               dict(layer=12, coef=1, trait_mean=55, coherence_mean=81)])["layer"]
    12
    """
    scored = [r for r in results if r["trait_mean"] is not None and r["coherence_mean"] is not None]
    ok = [r for r in scored if r["coherence_mean"] >= coherence_min]
    return max(ok, key=lambda r: r["trait_mean"]) if ok else None


def sweep_grid(model, vec_path: Path, layers, coefs, relative: bool) -> tuple[list, list]:
    """The sweep's layers (default: six over the middle two thirds of the network, each checked
    against the vector) and coefficients (the paper's 0.5 to 2.5 raw, or 0.05 to 0.25 relative)."""
    N = model.config.num_hidden_layers
    _, meta = model_vector(vec_path, model)
    layers = layers or sorted({round(N / 6 + i * (2 * N / 3) / 5) for i in range(6)})
    for L in layers:
        resolve_layer(L, meta, N)
    coefs = coefs or ([0.05, 0.1, 0.15, 0.2, 0.25] if relative else [0.5, 1.0, 1.5, 2.0, 2.5])
    return layers, coefs


def sweep(
    trait: str,
    model: str = DEFAULT_MODEL,
    judge: str | None = None,
    layers=None,
    coefs=None,
    relative: bool = False,
    samples=None,
    questions: int = 20,
    coherence_min: float = 75,
    cap=(),
    vectors=None,
    out=None,
    seed: int = 0,
    **options,
) -> dict:
    """Evaluate steering over a grid of layers x coefficients -> CSV, plot, and the best setting in
    its own file, TRAIT_sweep.json (the vector file is never changed; a later command steers at
    the sweep's layer only when told: --layer sweep).

    Defaults: see sweep_grid. The best: the highest trait score with coherence >= coherence_min.
    cap: --cap specs applied after the steering in every setting
    (the result is then TRAIT_sweep_cap-...json, which --layer sweep does not read). Each setting
    is cached like extract's answers, so an interrupted sweep resumes. options: see open_run.
    """
    t = load_trait(trait)
    cap = parsed(cap=cap)[1]
    vec_path = vector_path(Path(vectors) if vectors else default_vectors_dir(model), t.name)
    check = [SteerSpec.parse(f"{vec_path}:0")]
    run = open_run(
        t, model, questions, judge, out, vectors, check, cap, rollouts=samples, **options
    )
    layers, coefs = sweep_grid(run.model, vec_path, layers, coefs, relative)
    capped = "_" + file_label(cap, "cap-") if cap else ""
    check_name_length(run.out_dir / f"{t.name}_sweep{capped}.png", "the trait's name")
    questions, r = min(questions, len(t.eval_questions)), "r" if relative else ""
    results = []
    for i, (layer, coef) in enumerate((lay, c) for lay in layers for c in coefs):
        at = f"layer {layer}, coef {coef}"
        R.note(f"sweep {t.name}: setting {i + 1}/{len(layers) * len(coefs)} ({at})")
        steer = [SteerSpec.parse(f"{vec_path}:{coef}{r}")]
        label = f"L{layer}_c{coef}{r}{capped}"
        result = evaluate_setting(t, run, questions, steer, cap, layer, seed, label)
        results.append(R.sweep_row(layer, coef, relative, result, cap))
    best = best_setting(results, coherence_min)
    return R.write_sweep(
        run.out_dir, t.name, capped, results, best, vec_path, relative, coherence_min, cap
    )


# ---------------------------------------------------------------------------------------------
# Monitoring: does the projection before the reply predict the trait the reply will show?


def monitor_conditions(t, kind: str, seed: int = 0) -> list[tuple[str, str | None, list[dict]]]:
    """(label, system prompt, earlier turns) for each condition of the experiment, weakest first:
    the trait's graded system prompts, or k = 0, 5, 10, 15, 20 trait-exhibiting exchanges."""
    if kind == "system":
        if not t.graded_system_prompts:
            fix = "add them to its file (data/traits/SCHEMA.md)"
            raise UserError(f"trait {t.name} has no graded_system_prompts; {fix}")
        return [(f"sys{i}", p, []) for i, p in enumerate(t.graded_system_prompts)]
    if kind == "many-shot":
        pool = list(t.many_shot_examples or [])
        if len(pool) < 20:
            need = "at least 20 many_shot_examples for k up to 20"
            raise UserError(f"trait {t.name} needs {need}, has {len(pool)}")
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
        shots = []
        for i in order:
            shots.append({"role": "user", "content": pool[i]["question"]})
            shots.append({"role": "assistant", "content": pool[i]["answer"]})
        return [(f"k{k}", None, shots[: 2 * k]) for k in (0, 5, 10, 15, 20)]
    raise UserError(f"--kind must be system or many-shot, not {kind!r}")


def monitor_experiment(
    trait: str,
    kind: str = "system",
    model: str = DEFAULT_MODEL,
    judge=None,
    rollouts=None,
    questions: int = 20,
    layer=None,
    random: int = 100,
    vectors=None,
    out=None,
    seed: int = 0,
    **options,
) -> dict:
    """Projection of the last prompt token (before any reply) vs the condition's strength and the
    judged score of the reply.

    Without a judge: Spearman's rank correlation of condition grade and projection, with a
    permutation p-value. With one: Pearson r of projection and score, overall and within
    conditions, with bootstrap intervals. Each beside the same statistic on `random` random
    directions (the 95th percentile of their |r|) and, with a judge, on every other trait's vector
    found beside this one. Answers, projections and scores to CSV; the statistics to JSON.
    """
    t = load_trait(trait)
    conditions = monitor_conditions(t, kind, seed)
    check_count("random", random)
    run = open_run(t, model, questions, judge, out, vectors, rollouts=rollouts, **options)
    vec_file = vector_file(t.name, run.vectors_dir)
    vec, meta = model_vector(vec_file, run.model)
    L = resolve_layer(layer, meta, run.model.config.num_hidden_layers, vec_file)
    qs = t.eval_questions[:questions]
    jobs = R.monitor_jobs(conditions, qs, run.budget.rollouts)
    more = dict(kind=kind, questions=len(qs))
    settings = R.settings(model, t, run.budget, seed, run.tok.thinking, **more)
    R.monitor_plan(t.name, kind, conditions, len(qs), run.budget.rollouts, jobs, L)
    rows, acts, judge_name = sample_and_judge(t, run, jobs, seed, f"monitor-{t.name}", settings)
    h = acts["prompt_last"][:, L]  # [rows, hidden]: the state the reply will be written from
    proj = project(h, vec[L])
    labels = [c[0] for c in conditions]
    grade = torch.tensor([labels.index(r["condition"]) for r in rows], dtype=torch.float)
    nulls = random_directions(random, float(vec[L].norm()), h.shape[1], seed)
    csv_path = R.write_monitor_rows(run.out_dir, t.name, kind, rows, proj, grade, judge_name)
    result = dict(trait=t.name, kind=kind, layer=L, judge=judge_name)
    result |= R.monitor_grades(rows, labels, grade, proj, h, nulls, seed, csv_path)
    others = {o: unit(v[L]) for o, v in other_vectors(run.vectors_dir, t.name, vec).items()}
    result |= R.monitor_scores(t.name, rows, h, unit(vec[L]), others, nulls, seed, csv_path, L)
    band = random_band(h, proj, grade, len(conditions), unit(nulls))
    return R.write_monitor_result(csv_path, result, band, labels, grade, proj, random)


# ---------------------------------------------------------------------------------------------
# Finetuning data the model writes itself, and the finetuning shift of a trained model
# (train.py finetunes, with or without preventative steering).


def dataset_jobs(trait, kind: str, questions: list[str], n: int, seed: int) -> list[dict]:
    """n jobs: the pool in a seeded random order (again, as new rollouts, if n exceeds it), each
    under the trait's pos (kind "trait") or neg ("normal") prompt, cycling through the pairs."""
    side = {"trait": "pos", "normal": "neg"}[kind]
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed)).tolist()
    jobs = []
    for i in range(n):
        qi, k = order[i % len(questions)], i % len(trait.instructions)
        job = dict(key=f"{kind}:{i}", side=side, question_id=qi, rollout=i // len(questions))
        jobs.append(
            job | dict(instruction=k, question=questions[qi], system=trait.system_prompt(side, k))
        )
    return jobs


def make_dataset(
    trait: str,
    kind: str = "trait",
    n: int = 300,
    out=None,
    questions_file=None,
    model: str = DEFAULT_MODEL,
    judge=None,
    threshold: float = 50,
    coherence_threshold: float = 50,
    seed: int = 0,
    force: bool = False,
    **options,
) -> Path:
    """Write a finetuning dataset of the model's own answers -> the JSONL path (an existing file
    only with force).

    Each of n requests from the pool (default data/questions/everyday.json, never the trait's own
    questions) is answered under the trait-eliciting (kind="trait") or suppressing ("normal")
    system prompt and saved as {"messages": [user, assistant]}, without the system prompt. An
    answer cut off by the token budget is trimmed to its last full sentence; empty answers are
    dropped; with a judge, only answers scoring >= threshold (trait) or < threshold (normal), with
    coherence >= coherence_threshold, are kept. Resumable like extract. options: see open_run
    (with thinking, the answer saved is the text after </think>).
    """
    if kind not in ("trait", "normal"):
        raise UserError(f"--kind must be trait or normal, not {kind!r}")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    t = load_trait(trait)
    questions = load_questions(questions_file)
    R.check_no_overlap(t, questions)
    dest = Path(out) if out else R.dataset_path(model, t.name, kind)
    check_output(dest, force, inputs=[t.source, questions_file or QUESTIONS_FILE])
    run = open_run(t, model, 1, judge, dest.parent, rollouts=1, **options)
    jobs = dataset_jobs(t, kind, questions, n, seed)
    settings = R.dataset_settings(model, t, run, kind, n, questions, seed)
    R.dataset_plan(t, kind, n, questions_file or QUESTIONS_FILE, run.budget)
    name = f"dataset-{t.name}-{kind}"
    rows, _, judge_name = sample_and_judge(t, run, jobs, seed, name, settings)
    filters = dict(threshold=threshold, coherence_min=coherence_threshold)
    return R.write_dataset(
        dest, t.name, kind, rows, judge_name, run.budget.max_new_tokens, **filters
    )


@torch.no_grad()
def last_prompt_activations(
    model, tok, questions: list[str], batch_size=32, steer=()
) -> torch.Tensor:
    """The residual stream at the last prompt token (from which the reply is written) of each
    question as a single user turn, no system prompt beyond the template's -> [Q, N + 1, hidden].
    steer: interventions during the pass (an inference-time steered model)."""
    device, out = model.lm_head.weight.device, []
    for i in range(0, len(questions), batch_size):
        chats = [[{"role": "user", "content": q}] for q in questions[i : i + batch_size]]
        ids, mask = M.left_pad([tok.encode_chat(c) for c in chats], tok.pad_id)
        cap = M.Capture()
        model(ids.to(device), mask.to(device), steer=steer, capture=cap, logits="none")
        out.append(cap.prompt_last().cpu())
    return torch.cat(out)


def shift_controls(base_acts, finetuned_acts, vector, others: dict, random: int = 100, seed=0):
    """The shift at every layer [N + 1] beside its controls: the 95th percentile of |projection| of
    the same shift onto `random` random unit directions, its projection onto each other trait's
    vector (others: name -> [N + 1, hidden]), and the shift's norm."""
    dirs = random_directions(random, 1.0, vector.shape[1], seed)  # [random, hidden], unit
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
    layer=None,
    vectors=None,
    out=None,
    random: int = 100,
    with_eval: bool = False,
    judge=None,
    batch_size: int = 32,
    seed=0,
    force: bool = False,
    **options,
) -> dict:
    """Finetuning shift of `finetuned` against `base` along the trait's vector (from base).

    Last-prompt-token activations of both models on the trait's evaluation questions, mean
    finetuned minus mean base, on the unit vector at every layer -> CSV, with two controls on the
    same shift: the 95th percentile of |projection| onto `random` random unit directions, and the
    projection onto every other trait's vector. with_eval: evaluate both. options: device, dtype,
    thinking.
    """
    t = load_trait(trait)
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(base)
    vec_file = vector_path(vectors_dir, t.name)
    if not vec_file.is_file():
        fix = f"run `extract {t.name} --model {base}` first or pass --vectors DIR"
        raise UserError(f"no vector file {vec_file}; {fix}")
    vec, meta = load_vector(vec_file)
    expect_model(vec_file, finetuned)  # the base model's vector on its finetune, knowingly
    others = other_vectors(vectors_dir, t.name, vec)
    dest = Path(out) if out else R.shift_path(vectors_dir, t.name, finetuned)
    check_output(dest, force, [vec_file, *(vector_path(vectors_dir, o) for o in others)])
    acts = {}
    for label, name in (("base", base), ("finetuned", finetuned)):  # one model in memory at a time
        lm, tok, _, _ = load_checked(name, **options)
        check_fits(vec, meta, vec_file, lm.config.num_hidden_layers, lm.config.hidden_size, lm)
        R.note(f"shift {t.name}: {label} model {name}, {len(t.eval_questions)} questions")
        acts[label] = last_prompt_activations(lm, tok, t.eval_questions, batch_size)
        del lm
    L = resolve_layer(layer, meta, vec.shape[0] - 1, vec_file)
    controls = shift_controls(acts["base"], acts["finetuned"], vec, others, random, seed)
    result = R.write_shift(dest, t.name, L, controls, random)
    for label, name in (("base", base), ("finetuned", finetuned)) if with_eval else ():
        to = str(dest.parent / f"{dest.stem}-eval" / label)
        kw = dict(layer=L, vectors=str(vectors_dir), out=to, seed=seed, **options)
        result[f"eval_{label}"] = evaluate(t.name, name, judge, **kw)
    return result


# ---------------------------------------------------------------------------------------------
# Flagging training data


def flag(
    trait: str,
    dataset: str,
    model: str = DEFAULT_MODEL,
    layer=None,
    vectors=None,
    out=None,
    max_new_tokens: int = 200,
    max_tokens: int = 2048,
    batch_size: int = 8,
    seed: int = 0,
    device=None,
    dtype=None,
    force: bool = False,
) -> Path:
    """ΔP of every sample of a chat dataset along the trait's vector -> CSV, largest ΔP first
    (the samples most likely to instill the trait).

    A sample is a JSONL line {"messages": [...]}: the prompt is every message before the last
    assistant turn, the response y that turn. The model answers each prompt itself (y', greedy),
    and ΔP = (mean activation over y - mean over y') . v̂ at the layer. On the command line, and
    for millions of rows (several traits, streamed, sharded, resumable): python -m apps flag, which
    calls response_and_base and projection_difference too.
    """
    check_text(dataset, "dataset")  # exists, a file, UTF-8: before the model loads
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model)
    vec_file = vector_file(trait, vectors_dir)
    dest = Path(out) if out else R.flag_path(dataset, vec_file)
    check_output(dest, force, inputs=[dataset, vec_file])
    lm, tok, _, _ = load_checked(model, device, dtype)
    vec, meta = model_vector(vec_file, lm)
    L = resolve_layer(layer, meta, lm.config.num_hidden_layers, vec_file)
    samples, skipped = R.read_samples(dataset, tok, max_tokens)
    rows, t0 = [], time.time()
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        prompts, responses = [s["prompt"] for s in batch], [s["response"] for s in batch]
        acts = response_and_base(lm, tok, prompts, responses, max_new_tokens, seed=seed + i)
        delta_p = projection_difference(acts["response"][:, L], acts["base"][:, L], vec[L])
        rows += R.flag_rows(batch, delta_p, acts["base_tokens"])
        R.progress("flag", len(rows), len(samples), t0)
    return R.write_flags(dest, rows, skipped, L)


# =============================================================================================
# The command line: a subcommand per pipeline, its flags named as the function's parameters
# =============================================================================================


def generate_command(prompts: list[str], prompts_file=None, **kw) -> None:
    """`generate` on the command line: prompts from arguments and a file, answers printed."""
    if prompts_file:
        lines = read_text(prompts_file, "--prompts-file").splitlines()
        prompts = list(prompts) + [line for line in lines if line.strip()]
    t0 = time.time()
    for prompt, answer in zip(prompts, generate(prompts, **kw)):
        print(f">>> {prompt}\n{answer}\n")
    R.note(f"({time.time() - t0:.1f} s)")


# The applications' commands (apps/): started with `python -m apps COMMAND`; never imported here.
APP_COMMANDS = "monitor chat flag flag-merge export-gguf import-gguf import-vector generate-trait"
APP_COMMANDS = (*APP_COMMANDS.split(), "serve", "calibrate-cap")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="persona_vectors.py",
        description=__doc__.split("\n")[0],
        epilog="The applications (chat, serve, ...): python -m apps",
    )
    sub = p.add_subparsers(dest="command", required=True)
    H = cli.HELP

    c = sub.add_parser("extract", help="extract a persona vector for a trait")
    c.set_defaults(run=extract)
    c.add_argument("trait", help=H["trait"])
    c.add_argument("--model", default=DEFAULT_MODEL, help=H["model"])
    c.add_argument("--judge", help=H["judge"])
    c.add_argument("--questions", type=COUNT, default=20, help=H["questions"])
    c.add_argument("--pos-threshold", type=SCORE, default=50, help="keep pairs: pos score >= this,")
    c.add_argument("--neg-threshold", type=SCORE, default=50, help="neg score < this,")
    c.add_argument("--coherence-threshold", type=SCORE, default=50, help="coherences >= this")
    c.add_argument("--out", type=OUTPUT_DIR, help=H["out"])
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--rollouts", type=COUNT, help="default: 10 on CUDA, 1 on CPU")
    cli.add_options(c)

    c = sub.add_parser("generate", help="answer prompts with the chat model, optionally steered")
    c.set_defaults(run=generate_command)
    c.add_argument("prompts", nargs="*", help="one or more user messages")
    c.add_argument("--prompts-file", type=TEXT_FILE, help="one prompt per line")
    c.add_argument("--model", default=DEFAULT_MODEL, help=H["model"])
    c.add_argument("--system", help="system prompt (default: the model's own template decides)")
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=200)
    c.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-p", type=TOP_P, default=1.0)
    c.add_argument("--seed", type=SEED, default=0)
    cli.add_steering(c)
    c.add_argument("--vectors", help=H["vectors"])
    cli.add_device(c)

    c = sub.add_parser("eval", help="trait expression on the evaluation questions, steered or not")
    c.set_defaults(run=evaluate)
    c.add_argument("trait", help=H["trait"])
    c.add_argument("--model", default=DEFAULT_MODEL, help=H["model"])
    c.add_argument("--judge", help=H["judge"])
    c.add_argument("--samples", type=COUNT, help=H["samples"])
    c.add_argument("--questions", type=COUNT, default=20, help=H["questions"])
    cli.add_steering(c)
    c.add_argument("--vectors", help=H["vectors"])
    c.add_argument("--out", type=OUTPUT_DIR, help=H["out"])
    c.add_argument("--seed", type=SEED, default=0)
    cli.add_options(c)

    c = sub.add_parser("sweep", help="steer over layers x coefficients -> TRAIT_sweep.csv, .json")
    c.set_defaults(run=sweep)
    c.add_argument("trait", help=H["trait"])
    c.add_argument("--model", default=DEFAULT_MODEL, help=H["model"])
    c.add_argument("--judge", help=H["judge"])
    c.add_argument("--layers", type=layers, help="e.g. 8,12,16 or 14-20")
    c.add_argument("--coefs", type=listed(COEF), help="e.g. 0.5,1,2")
    c.add_argument("--relative", action="store_true", help="coefs relative to the residual norm")
    c.add_argument("--samples", type=COUNT, help="answers per question and setting")
    c.add_argument("--questions", type=COUNT, default=20, help=H["questions"])
    c.add_argument("--coherence-min", type=SCORE, default=75)
    c.add_argument("--cap", action="append", default=[], metavar=CAP_SPEC, help=H["cap"])
    c.add_argument("--vectors", help=H["vectors"])
    c.add_argument("--out", type=OUTPUT_DIR, help=H["out"])
    c.add_argument("--seed", type=SEED, default=0)
    cli.add_options(c, sampling=False)

    c = sub.add_parser("monitor-experiment", help="does the projection before a reply predict it?")
    c.set_defaults(run=monitor_experiment)
    c.add_argument("trait", help=H["trait"])
    c.add_argument("--kind", choices=["system", "many-shot"], default="system")
    c.add_argument("--model", default=DEFAULT_MODEL, help=H["model"])
    c.add_argument("--judge", help=H["judge"])
    c.add_argument("--rollouts", type=COUNT, help="answers per condition and question")
    c.add_argument("--questions", type=COUNT, default=20, help=H["questions"])
    c.add_argument("--layer", type=layer_or_sweep, help=H["layer"])
    c.add_argument("--random", type=COUNT, default=100, help="random directions (the null)")
    c.add_argument("--vectors", help=H["vectors"])
    c.add_argument("--out", type=OUTPUT_DIR, help=H["out"])
    c.add_argument("--seed", type=SEED, default=0)
    cli.add_options(c, sampling=False)

    c = sub.add_parser("make-dataset", help="finetuning data: the model's own answers")
    c.set_defaults(run=make_dataset)
    c.add_argument("trait", help=H["trait"])
    c.add_argument("--kind", choices=["trait", "normal"], default="trait")
    c.add_argument("--n", type=COUNT, default=300, help="answers to generate")
    c.add_argument("--out", type=OUTPUT_FILE, help="default: datasets/<model>/TRAIT_KIND.jsonl")
    c.add_argument("--questions-file", type=TEXT_FILE, help="default: data/questions/everyday.json")
    c.add_argument("--model", default=DEFAULT_MODEL, help=H["model"])
    c.add_argument("--judge", help=H["judge"])
    c.add_argument(
        "--threshold", type=SCORE, default=50, help="trait: keep >= this, normal: < this"
    )
    c.add_argument("--coherence-threshold", type=SCORE, default=50, help="and coherence >= this")
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    cli.add_options(c, judge=False)

    c = sub.add_parser("shift", help="the finetuning shift along a vector, with controls")
    c.set_defaults(run=shift)
    c.add_argument("trait", help=H["trait"])
    c.add_argument("--finetuned", required=True, help="the finetuned model (directory or hub id)")
    c.add_argument("--base", default=DEFAULT_MODEL, help="before finetuning (default: %(default)s)")
    c.add_argument("--layer", type=layer_or_sweep, help=H["layer"] + "; printed; the CSV has all")
    c.add_argument("--vectors", help="default: vectors/<base model name>/")
    c.add_argument("--out", type=OUTPUT_FILE, help="default: <vectors>/TRAIT_shift_<finetuned>.csv")
    c.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    c.add_argument("--random", type=COUNT, default=100, help="random directions for the control")
    c.add_argument("--with-eval", "--eval", action="store_true", help="eval both models too")
    c.add_argument("--judge", help="for --with-eval: " + H["judge"])
    c.add_argument("--batch-size", type=COUNT, default=32)
    c.add_argument("--seed", type=SEED, default=0)
    cli.add_device(c)

    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in APP_COMMANDS:
        where = f"`{argv[0]}` moved to the applications: python -m apps {argv[0]} ..."
        print(f"persona_vectors.py: error: {where}", file=sys.stderr)
        raise SystemExit(2)  # as argparse exits on a command line it cannot take
    parser = build_parser()
    args = parser.parse_args(argv)

    def command():
        flags = dict(vars(cli.check_paths(parser, args)))  # every path checked before any work
        function, _ = flags.pop("run"), flags.pop("command")
        return function(**flags)  # each flag is the parameter of the same name

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
