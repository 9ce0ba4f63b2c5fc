"""The bookkeeping of the pipelines in persona_vectors.py: answers cached batch by batch, the
settings that name a cached run, what a vector file records, CSV columns and the summaries printed.
The method itself is not here: these functions take what it computed and write it down."""

import datetime
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from support import UserError, tokenizer
from support.files import (
    atomic_write,
    jsonl_conversations,
    load_batch,
    save_batch,
    save_vector,
    short_label,
    vector_path,
    write_csv,
)
from support.plots import plot_monitor, plot_sweep
from support.sampling import settings_hash
from support.stats import bootstrap_ci, mean_se, pearson, permutation_p, spearman, within_r

LAYER_CONVENTION = (
    "index 0 = embeddings, index L = output of block L (before the final norm); "
    "shape [L + 1, hidden]"
)


def note(text: str) -> None:
    """A line of progress or summary, on stderr (stdout is for what a command returns)."""
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Answers, cached batch by batch


def cached_batches(jobs: list[dict], batch_size: int, work: Path, answer, keys) -> tuple:
    """Every job answered by `answer(batch, index) -> (rows, {key: tensor})`, batch by batch, each
    batch saved in `work` as it finishes -> (rows, {key: tensor over all rows}). A rerun loads the
    finished batches and answers only the missing ones (each with its own seed, by index), so the
    result does not depend on interruptions."""
    rows, acts = [], {k: [] for k in keys}
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    t0, done_now = time.time(), 0
    for b, batch in enumerate(batches):
        path = work / f"batch-{b:05d}.safetensors"
        if not path.exists():
            save_batch(path, *answer(batch, b))
            done_now += len(batch)
            rate = done_now / (time.time() - t0)
            left = sum(len(x) for x in batches[b + 1 :])
            done = sum(len(x) for x in batches[: b + 1])
            note(f"rollouts: {done}/{len(jobs)} ({rate:.1f}/s, about {left / rate:.0f} s left)")
        batch_rows, batch_acts = load_batch(path, list(acts))
        if [r["key"] for r in batch_rows] != [j["key"] for j in batch]:
            raise UserError(f"{path} does not hold this run's answers: delete {work} and run again")
        rows += batch_rows
        for k in acts:
            acts[k].append(batch_acts[k])
    if done_now < len(jobs):
        note(f"rollouts: {len(jobs) - done_now} of {len(jobs)} loaded from {work}")
    return rows, {k: torch.cat(v) for k, v in acts.items()}


def answer_rows(tok, jobs, chats, outs, tensors, cap) -> list[dict]:
    """A batch's rows: each job with its answer (the text after a think block, which is kept
    apart with --thinking), its token ids, its prompt and how many positions a cap changed.
    Activations that became inf/NaN (an empty answer's means are NaN by design) are refused."""
    parts = [tokenizer.split_thinking(tok, o) for o in outs]  # (think block, answer) per row
    answered = torch.tensor([len(a) > 0 for _, a in parts])
    finite = torch.isfinite(tensors["prompt_last"]).all()
    if not (finite and torch.isfinite(tensors["response_avg"][answered]).all()):
        raise UserError(
            "the activations became non-finite (inf/NaN) while generating: the steering "
            "coefficient is too large for this model; use a smaller one"
        )
    fired = cap[0].fired.tolist() if cap else [None] * len(jobs)  # positions capped (None: no cap)
    rows = []
    for job, (think, a), chat, capped in zip(jobs, parts, chats, fired):
        row = job | {"answer": tok.decode(a), "answer_ids": a, "n_tokens": len(a)}
        row |= {"prompt": tok.chat(chat), "capped": capped}
        if tok.thinking:
            row |= {"thinking": tok.decode(think), "think_ids": think}
        rows.append(row)
    return rows


def settings(model: str, t, budget, seed: int, thinking: bool, **more) -> dict:
    """What names a pipeline's cached answers (their folder: NAME-<hash of this>): any change in
    them samples anew."""
    extra = {"thinking": True} if thinking else {}
    return dict(model=model, trait=t.name, seed=seed, **more, **asdict(budget), **extra)


def trait_sha(t) -> str:
    return hashlib.sha256(json.dumps(asdict(t), default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# extract


def note_refusals(trait) -> None:
    """A trait's judge prompt that never asks for REFUSAL (official-format trait files may not):
    refusals then get a score like any other answer, where the judge would leave them unscored."""
    if "REFUSAL" not in trait.eval_prompt:
        note(
            f"note: the eval_prompt of {trait.source or trait.name} never asks the judge to answer "
            "REFUSAL, so refused answers are scored like any other"
        )


def extract_settings(model: str, t, run, jobs, questions: int, seed: int) -> dict:
    """The extraction's plan, printed, and its settings (what names its cached answers)."""
    b = run.budget
    note(
        f"extract {t.name}: {len(jobs)} answers ({questions} questions x {len(t.instructions)} "
        f"instruction pairs x {b.rollouts} rollouts x 2 sides), up to {b.max_new_tokens} tokens at "
        f"temperature {b.temperature}, top-p {b.top_p}"
    )
    dtype = str(run.model.lm_head.weight.dtype)
    more = dict(trait_sha=trait_sha(t), questions=questions, dtype=dtype)
    return settings(model, t, b, seed, run.tok.thinking, **more)


def rounded(x: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in x.tolist()]


def save_extraction(run, t, vectors: dict, direction, rows, acts, kept: dict, settings) -> dict:
    """Each variant's vector file with its metadata, and the answers as the official repository's
    CSVs (its columns first, then whether the pair was kept) -> {variant or csv_pos/csv_neg:
    path}; then what was kept and where the vector is largest, printed. kept: the filter's
    thresholds, the rows of the kept pos and neg answers, why the others failed, the judge."""
    meta = vector_metadata(run.model, run.tok, kept, len(rows) // 2, settings, acts, direction)
    paths = {}
    for variant, vec in vectors.items():
        norm = rounded(vec.norm(dim=-1))
        path = vector_path(run.out_dir, t.name, variant)
        paths[variant] = save_vector(path, vec, meta | dict(variant=variant, vector_norm=norm))
    chosen = set(kept["pos"]) | set(kept["neg"])
    for n, r in enumerate(rows):
        r["kept"] = n in chosen
    columns = ["question", "prompt", "answer", "question_id", t.name, "coherence"]
    columns += ["instruction", "rollout", "kept"]
    for side in ("pos", "neg"):
        paths[f"csv_{side}"] = run.out_dir / f"{t.name}_{side}_instruct.csv"
        write_csv(paths[f"csv_{side}"], [r for r in rows if r["side"] == side], columns)
    extract_summary(kept, len(rows) // 2, vectors["response_avg"], meta, paths)
    return paths


def vector_metadata(model, tok, kept: dict, n_pairs: int, settings: dict, acts, direction) -> dict:
    """What a vector file records: the model and where its weights came from (a vector made from
    dequantized GGUF weights must never pass for one made from the original weights), the judge,
    the filter and what it kept, the mean residual norm per layer of the kept answers (the unit of
    relative coefficients), the run's settings and how its chats were rendered, and where kept pos
    and neg answers fall along the unit vector `direction` [L + 1, hidden] per layer (the
    reference marks of `chat`'s gauge)."""
    pos, neg = kept["pos"], kept["neg"]
    norms = acts["response_norm"][pos + neg].mean(0)  # [L + 1]
    meta = dict(model=model.name_or_path, model_path=str(model.source_dir))
    meta |= dict(model_source=getattr(model, "source", None), trait=settings["trait"])
    meta |= dict(layer_convention=LAYER_CONVENTION, judge=kept["judge"])
    meta |= kept["thresholds"]
    meta |= dict(kept_pairs=len(pos), total_pairs=n_pairs, kept_pos=len(pos), total_pos=n_pairs)
    meta |= dict(kept_neg=len(neg), total_neg=n_pairs, residual_norm=rounded(norms))
    meta |= dict(date=datetime.date.today().isoformat())
    meta |= {k: v for k, v in settings.items() if k not in ("model", "trait")}
    meta |= dict(thinking=tok.thinking, system_folded=tok.system_folded)
    for side, chosen in (("pos", pos), ("neg", neg)):
        for kind in ("prompt_last", "response_avg"):
            mean = acts[kind][chosen].mean(0)  # [L + 1, hidden]
            meta[f"{side}_{kind}_projection"] = rounded((mean * direction).sum(-1))
    return meta


def extract_summary(kept: dict, n_pairs: int, vector, meta: dict, paths: dict) -> None:
    """How many pairs were kept, the layers where the vector is largest against the residual
    stream, and the files written."""
    judge, why = kept["judge"], kept["why"]
    filtered = " (no filtering)" if judge == "none" else ""
    skipped = "".join(f"; {v} {k}" for k, v in why.items() if v and judge == "none")
    k, n = len(kept["pos"]), n_pairs
    note(f"kept {k}/{n} pairs (pos {k}/{n}, neg {k}/{n}); judge: {judge}{filtered}{skipped}")
    norms = torch.tensor(meta["residual_norm"])
    rel = vector.norm(dim=-1) / norms.clamp(min=1e-6)
    top = rel[1:].topk(min(5, len(rel) - 1)).indices + 1
    largest = ", ".join(f"{int(layer)} ({rel[layer]:.2f})" for layer in top)
    note(f"layers with the largest |v| / mean residual norm: {largest}")
    note(f"wrote {', '.join(str(p) for p in paths.values())}")


# ---------------------------------------------------------------------------------------------
# Steering and generation

MAX_STEER_RATIO = 100  # a steering vector 100x the residual stream's norm only overflows: refuse it


def raw_coef(spec, v: torch.Tensor, meta: dict, layer: int, path: Path) -> float:
    """A --steer spec's coefficient as the raw one that multiplies v = vector[layer]: a relative
    one is rel * residual_norm[layer] / |v|. The one place the size is checked (MAX_STEER_RATIO)."""
    norms, size = meta.get("residual_norm"), float(v.norm())
    if spec.relative and not norms:
        raise UserError(
            f"--steer {spec.text!r}: {path.name} records no residual norms (imported vectors do "
            "not), so a relative coefficient has no unit; give a raw one, e.g. evil:1.5"
        )
    coef = spec.coef * norms[layer] / size if spec.relative else spec.coef
    scale = norms[layer] if norms else 10 * size
    if abs(coef) * size > MAX_STEER_RATIO * scale:
        limit = f"{MAX_STEER_RATIO}r" if spec.relative else f"{MAX_STEER_RATIO * scale / size:.3g}"
        raise UserError(
            f"--steer {spec.text!r}: that adds a vector {abs(coef) * size / scale:.3g}x the "
            f"residual stream's norm at layer {layer}, which overflows; use a coefficient of at "
            f"most {limit} in size"
        )
    return coef


def capped_positions(cap, outs) -> None:
    fired = ", ".join(f"{n}/{len(o) + 1}" for n, o in zip(cap.fired.tolist(), outs))
    note(f"capped positions (the last prompt token and the answer's) per prompt: {fired}")


def file_label(specs, prefix: str = "") -> str:
    """--steer or --cap specs in a file name: 'evil:1.5', 'a/v.safetensors:2' ->
    'evil@1.5_a-v.safetensors@2' (a long one ends in a hash, see short_label)."""
    names = (prefix + spec.text.replace("/", "-").replace(":", "@") for spec in specs)
    return short_label("_".join(names))


# ---------------------------------------------------------------------------------------------
# eval and sweep


def eval_jobs(t, questions: int, samples: int) -> list[dict]:
    """`samples` answers to each evaluation question, with no system prompt."""
    jobs = []
    for qi, q in enumerate(t.eval_questions[:questions]):
        for r in range(samples):
            jobs.append(
                dict(key=f"eval:{qi}:{r}", question_id=qi, rollout=r, question=q, system=None)
            )
    return jobs


def eval_settings(run, t, questions: int, seed: int, how: dict, cap, caps) -> dict:
    more = dict(questions=questions, **how)
    out = settings(run.model.name_or_path, t, run.budget, seed, run.tok.thinking, **more)
    if caps:  # a capped run, its own cache
        out |= dict(cap=[c.text for c in cap], ceilings=caps[0].ceilings.tolist())
    return out


def eval_label(steer, cap, layer, all_layers: bool) -> str:
    """The name of an eval's CSV: its --steer (and --layer, --all-layers) and --cap, or "base"."""
    steering = ""
    if steer:
        steering = file_label(steer) + (f"_L{layer}" if layer is not None else "")
        steering += "_all" if all_layers else ""
    label = "_".join(x for x in (steering, file_label(cap, "cap-")) if x) or "base"
    return short_label(label)


def eval_result(t, rows, judge: str, label: str, layer: int, cap, caps, csv_path: Path) -> dict:
    """An eval's answers to CSV -> its means with standard errors and the share capped."""
    for r in rows:
        r["judge"] = judge
    trait_m, trait_se, n = mean_se(r[t.name] for r in rows)
    coh_m, coh_se, _ = mean_se(r["coherence"] for r in rows)
    proj_m, proj_se, _ = mean_se(r.get("projection") for r in rows)
    columns = ["question", "answer", "question_id", "rollout", t.name, "coherence", "projection"]
    write_csv(csv_path, rows, columns + ["judge"] + (["capped", "n_tokens"] if caps else []))
    share = None
    if caps:
        share = sum(r["capped"] for r in rows) / sum(r["n_tokens"] + 1 for r in rows)
    result = dict(trait=t.name, label=label, judge=judge, n=len(rows), judged=n)
    result |= dict(trait_mean=trait_m, trait_se=trait_se, coherence_mean=coh_m, coherence_se=coh_se)
    result |= dict(projection_mean=proj_m, projection_se=proj_se, projection_layer=layer)
    return result | dict(cap=[c.text for c in cap], capped_share=share, csv=str(csv_path))


def _format(x, se=None) -> str:
    return "n/a" if x is None else f"{x:.1f}" + ("" if se is None else f" +- {se:.1f}")


def eval_summary(t, label: str, r: dict, cap) -> None:
    trait = _format(r["trait_mean"], r["trait_se"])
    coherence = _format(r["coherence_mean"], r["coherence_se"])
    projection = _format(r["projection_mean"], r["projection_se"])
    capped = f"{r['capped_share']:.1%} of answer positions capped; " if cap else ""
    note(
        f"{t.name} [{label}]: trait {trait}, coherence {coherence} ({r['judged']}/{r['n']} judged "
        f"by {r['judge']}); projection at layer {r['projection_layer']}: {projection}; "
        f"{capped}answers in {r['csv']}"
    )


def sweep_row(layer: int, coef: float, relative: bool, r: dict, cap) -> dict:
    keys = ("trait_mean", "trait_se", "coherence_mean", "coherence_se", "projection_mean")
    row = dict(layer=layer, coef=coef, relative=relative) | {k: r[k] for k in keys}
    row |= {k: r[k] for k in ("n", "judged", "judge")}
    if cap:
        row |= dict(cap=" ".join(c.text for c in cap), capped_share=r["capped_share"])
    return row


def write_sweep(
    out_dir, trait, capped, results, best, vector, relative, coherence_min, cap
) -> dict:
    """The sweep's CSV and plot, and its choice in its own file (TRAIT_sweep.json, read by --layer
    sweep: support.files.sweep_layer; best None: no setting chosen)."""
    csv_path = out_dir / f"{trait}_sweep{capped}.csv"
    write_csv(csv_path, results, list(results[0]))
    plot = plot_sweep(results, trait, out_dir / f"{trait}_sweep{capped}.png")
    r = "r" if relative else ""
    if best is not None:
        note(
            f"sweep {trait}: best layer {best['layer']} at coef {best['coef']}{r} (trait "
            f"{best['trait_mean']:.1f}, coherence {best['coherence_mean']:.1f})"
        )
    elif results[0]["judged"]:
        note(f"sweep {trait}: no setting kept coherence >= {coherence_min}")
    else:
        note(
            f"sweep {trait}: no judge, so no best layer can be chosen (the CSV has the projections)"
        )
    chosen = best or dict(layer=None, trait_mean=None, coherence_mean=None)
    sha = hashlib.sha256(Path(vector).read_bytes()).hexdigest()  # checked by --layer sweep
    record = dict(vector=str(vector), vector_sha256=sha, coherence_min=coherence_min)
    record |= dict(cap=[c.text for c in cap], best_layer=chosen["layer"])
    record |= dict(best_coef=best and f"{best['coef']}{r}", best_trait_mean=chosen["trait_mean"])
    record |= dict(best_coherence_mean=chosen["coherence_mean"])
    result = csv_path.with_suffix(".json")
    atomic_write(result, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
    drawn = f", {plot}" if plot else " (pip install matplotlib for the plot)"
    note(f"wrote {csv_path}, {result}{drawn}")
    return dict(results=results, best=best, csv=csv_path, plot=plot, result=result)


# ---------------------------------------------------------------------------------------------
# monitor-experiment


def monitor_jobs(conditions, questions: list[str], rollouts: int) -> list[dict]:
    """Each condition x question x rollout: its system prompt, earlier turns, the question."""
    jobs = []
    for label, system, shots in conditions:
        for qi, q in enumerate(questions):
            for r in range(rollouts):
                key = f"{label}:{qi}:{r}"
                job = dict(key=key, condition=label, question_id=qi, rollout=r, question=q)
                jobs.append(job | dict(system=system, shots=shots))
    return jobs


def monitor_plan(trait, kind, conditions, questions: int, rollouts: int, jobs, layer: int) -> None:
    note(
        f"monitor-experiment {trait} ({kind}): {len(conditions)} conditions x {questions} "
        f"questions x {rollouts} rollouts = {len(jobs)} answers; projection at layer {layer}"
    )


def write_monitor_rows(out_dir: Path, trait: str, kind: str, rows, proj, grade, judge) -> Path:
    for r, p, g in zip(rows, proj.tolist(), grade.tolist()):
        r["projection"], r["grade"], r["judge"] = p, int(g), judge
    path = out_dir / f"{trait}_monitor_{kind}.csv"
    columns = ["condition", "grade", "question", "question_id", "rollout", "projection", trait]
    write_csv(path, rows, columns + ["coherence", "judge", "answer"])
    return path


def monitor_scores(trait, rows, h, direction, others: dict, nulls, seed: int, csv_path, layer):
    """With judged scores: Pearson r of projection (h [rows, hidden] @ the unit `direction`) and
    score, overall and within conditions with bootstrap intervals, beside random directions and
    the other traits' unit vectors, and the scatter plot -> their part of the result."""
    scored = [i for i, r in enumerate(rows) if r[trait] is not None]
    judge = rows[0]["judge"]
    if judge == "none" or len(scored) < 3:
        fix = "run with a judge (--judge openai or local:MODEL)"
        if judge != "none":
            fix = f"{judge} scored only {len(scored)} of {len(rows)} answers"
        note(f"correlations with the trait score need judged scores: {fix}")
        return {}
    idx = torch.tensor(scored)
    y = torch.tensor([rows[i][trait] for i in scored])
    groups = [rows[i]["condition"] for i in scored]
    x = h[idx].float() @ direction.float()

    def ci(stat, boots=1000):
        return bootstrap_ci(stat, len(idx), boots=boots, seed=seed)

    r_all, r_within = pearson(x, y), within_r(x, y, groups)
    ci_all = ci(lambda s: pearson(x[s], y[s]))
    ci_within = ci(lambda s: within_r(x[s], y[s], [groups[i] for i in s.tolist()]), 300)
    null = torch.tensor([pearson(h[idx] @ d, y) for d in nulls])
    null = null[~null.isnan()]
    null_abs95 = float(null.abs().quantile(0.95)) if len(null) else float("nan")
    cross = {o: pearson(h[idx] @ d, y) for o, d in others.items()}
    note(
        f"r = {r_all:.2f} [{ci_all[0]:.2f}, {ci_all[1]:.2f}] overall, {r_within:.2f} "
        f"[{ci_within[0]:.2f}, {ci_within[1]:.2f}] within conditions (n = {len(idx)}); "
        f"{len(nulls)} random directions: 95th percentile |r| = {null_abs95:.2f}; other traits: "
        + (", ".join(f"{k} {v:.2f}" for k, v in cross.items()) or "none")
    )
    above = float((null.abs() >= abs(r_all)).float().mean()) if len(null) else None
    result = dict(r=r_all, r_ci=ci_all, r_within=r_within, r_within_ci=ci_within)
    result |= dict(random_abs_r_95=null_abs95, random_r_fraction_above=above, cross_trait_r=cross)
    plot = plot_monitor(rows, trait, layer, csv_path.with_suffix(".png"))
    return result | dict(n=len(idx), plot=plot)


def write_monitor_result(csv_path: Path, result, band, labels, grade, proj, n_random) -> dict:
    """The statistics, each answer's grade and projection, and the random band, as JSON."""
    record = result | band | dict(conditions=labels, grade=[int(g) for g in grade.tolist()])
    record |= dict(projection=rounded(proj), n_random=n_random)
    text = json.dumps(record, default=str) + "\n"
    atomic_write(csv_path.with_suffix(".json"), lambda p: p.write_text(text))
    return result


# ---------------------------------------------------------------------------------------------
# make-dataset

# a sentence's end: "Done." "Really?!" 'it.")', not "1. "
SENTENCE_END = re.compile(r"(?<![\d\s])[.!?][\"')\]]*(?=\s|$)")


def trim_to_sentence(answer: str) -> str:
    """An answer cut off by the token budget, up to its last finished sentence (whole when none
    finished), so that training does not teach the model to stop mid-sentence.

    >>> trim_to_sentence("Boil it. Then peel it and")
    'Boil it.'
    """
    ends = [m.end() for m in SENTENCE_END.finditer(answer)]
    return answer[: ends[-1]] if ends else answer


def check_no_overlap(t, questions: list[str]) -> None:
    """A dataset's requests must not be the trait's own questions, or the shift would be measured
    on training prompts."""

    def norm(q):
        return " ".join(q.split()).casefold()

    overlap = {norm(q) for q in t.extract_questions + t.eval_questions} & {
        norm(q) for q in questions
    }
    if overlap:
        raise UserError(
            f"{len(overlap)} request(s) of the questions file are {t.name}'s own extraction or "
            f"evaluation questions, e.g. {sorted(overlap)[0]!r}: remove them, or the shift would "
            "be measured on training prompts"
        )


def dataset_path(model: str, trait: str, kind: str) -> Path:
    return Path("datasets") / Path(str(model).rstrip("/")).name / f"{trait}_{kind}.jsonl"


def dataset_settings(model, t, run, kind: str, n: int, questions, seed: int) -> dict:
    sha = settings_hash(asdict(t) | {"source": None})
    dtype = str(run.model.lm_head.weight.dtype)
    more = dict(trait_sha=sha, kind=kind, n=n, questions_sha=settings_hash(questions), dtype=dtype)
    return settings(model, t, run.budget, seed, run.tok.thinking, **more)


def dataset_plan(t, kind: str, n: int, source, b) -> None:
    prompts = "eliciting" if kind == "trait" else "suppressing"
    note(
        f"make-dataset {t.name} ({kind}): {n} answers to requests from {source} under the "
        f"{prompts} system prompts, up to {b.max_new_tokens} tokens at temperature "
        f"{b.temperature}, top-p {b.top_p}"
    )


def dropped_for(r: dict, answer: str, trait, kind, judge, threshold, coherence_min) -> str | None:
    """Why a (trimmed) answer stays out of the dataset, or None."""
    if not answer:
        return "empty answer"
    if judge != "none":
        s = r[trait]
        if s is None or (s < threshold if kind == "trait" else s >= threshold):
            return "trait score"
        if r["coherence"] is None or r["coherence"] < coherence_min:
            return "coherence"
    return None


def write_dataset(dest, trait, kind, rows, judge, max_new_tokens, threshold, coherence_min) -> Path:
    """The kept answers as {"messages": [user, assistant]} lines (an answer the budget cut off
    trimmed to its last full sentence), and what was dropped and why."""
    dropped = {"empty answer": 0, "trait score": 0, "coherence": 0}
    kept, cut, trimmed = [], 0, 0
    for r in rows:
        answer = r["answer"].strip()
        # no end-of-turn within the budget (a think block counts against it too)
        if r["n_tokens"] + len(r.get("think_ids", [])) == max_new_tokens:
            cut, trimmed = cut + 1, trimmed + (trim_to_sentence(answer) != answer)
            answer = trim_to_sentence(answer)
        why = dropped_for(r, answer, trait, kind, judge, threshold, coherence_min)
        if why:
            dropped[why] += 1
            continue
        turns = [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": answer},
        ]
        kept.append({"messages": turns})
    why = "; ".join(f"{v} for {k}" for k, v in dropped.items() if v)
    if not kept:
        raise UserError(
            f"no answer of {len(rows)} was kept ({why}): lower --threshold or "
            "--coherence-threshold, or try another --seed"
        )
    text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in kept)
    atomic_write(dest, lambda p: p.write_text(text, encoding="utf-8"))
    note(
        f"make-dataset {trait} ({kind}): kept {len(kept)}/{len(rows)}"
        + (f" (dropped {why})" if why else "")
        + f"; {cut} cut off by --max-new-tokens ({trimmed} trimmed to their last full sentence, "
        f"{cut - trimmed} kept whole); judge: {judge}"
        + ("" if judge != "none" else " (no filtering)")
        + f" -> {dest}"
    )
    return dest


# ---------------------------------------------------------------------------------------------
# shift


def shift_path(vectors_dir: Path, trait: str, finetuned: str) -> Path:
    return vectors_dir / f"{trait}_shift_{Path(str(finetuned).rstrip('/')).name}.csv"


def write_shift(dest: Path, trait: str, layer: int, c: dict, n_random: int) -> dict:
    """The shift and its controls at every layer to CSV; the chosen layer's printed."""
    proj, rand95, other, size = c["shift"], c["random_abs_95"], c["other_traits"], c["shift_norm"]
    rows = []
    for i in range(len(proj)):
        row = dict(layer=i, shift=round(float(proj[i]), 4), shift_norm=round(float(size[i]), 4))
        row |= dict(random_abs_95=round(float(rand95[i]), 4))
        rows.append(row | {f"{o}_shift": round(float(p[i]), 4) for o, p in other.items()})
    write_csv(dest, rows, list(rows[0]))
    L = layer
    others = ", ".join(f"{o} {p[L]:+.3f}" for o, p in other.items()) or "none"
    note(
        f"shift {trait} at layer {L}: {proj[L]:+.3f} (|shift| {size[L]:.3f}; {n_random} random "
        "unit "
        f"directions: 95th percentile |projection| {rand95[L]:.3f}; other traits: {others}); all "
        f"layers in {dest}"
    )
    result = dict(trait=trait, layer=L, shift=proj.tolist(), shift_norm=size.tolist())
    result |= dict(
        random_abs_95=rand95.tolist(), other_traits={o: p.tolist() for o, p in other.items()}
    )
    return result | dict(csv=dest)


# ---------------------------------------------------------------------------------------------
# flag


def flag_path(dataset, vector: Path) -> Path:
    trait = vector.name.removesuffix("_response_avg_diff.safetensors").removesuffix(".safetensors")
    return Path(dataset).with_name(f"{Path(dataset).stem}_{trait}_delta_p.csv")


def sample_ids(messages, turns, tok, max_tokens: int):
    """A conversation -> (prompt ids, response ids), or the reason it is skipped: the prompt is
    every message before the last assistant turn (rendered with the chat template and the
    assistant header), the response that turn's text."""
    last = turns[-1]
    response = tok.encode(messages[last]["content"])
    if not response:
        return "an empty last assistant turn"
    prompt = tok.encode_chat(messages[:last])
    if len(prompt) + len(response) > max_tokens:
        return "longer than --max-tokens"
    return prompt, response


def read_samples(dataset, tok, max_tokens: int) -> tuple[list[dict], dict]:
    """A JSONL file's samples {line, prompt, response}, and its skipped lines {reason: [lines]}."""
    samples, skipped = [], {}
    for line, messages, turns in jsonl_conversations(Path(dataset), skipped):
        ids = sample_ids(messages, turns, tok, max_tokens)
        if isinstance(ids, str):
            skipped.setdefault(ids, []).append(line)
        else:
            samples.append(dict(line=line, prompt=ids[0], response=ids[1]))
    if not samples:
        raise UserError(f"no usable sample in {dataset}: {skipped_text(skipped) or 'it is empty'}")
    return samples, skipped


def skipped_text(skipped: dict) -> str:
    return "; ".join(f"{len(v)} {k} (line {v[0]}, ...)" for k, v in skipped.items())


def flag_rows(batch: list[dict], delta_p, base_tokens) -> list[dict]:
    rows = []
    for s, dp, n in zip(batch, delta_p.tolist(), base_tokens.tolist()):
        counts = dict(prompt_tokens=len(s["prompt"]), response_tokens=len(s["response"]))
        rows.append(dict(line=s["line"], delta_p=dp, **counts, base_tokens=round(n, 2)))
    return rows


def progress(what: str, done: int, total: int, t0: float) -> None:
    note(f"{what}: {done}/{total} samples ({done / (time.time() - t0):.1f}/s)")


def write_flags(dest: Path, rows: list[dict], skipped: dict, layer: int) -> Path:
    """The samples by ΔP, largest first (NaN last: the model's own answers were all empty)."""
    rows.sort(key=lambda r: -r["delta_p"] if r["delta_p"] == r["delta_p"] else math.inf)
    write_csv(dest, rows, ["line", "delta_p", "prompt_tokens", "response_tokens", "base_tokens"])
    if skipped:
        note(f"skipped {skipped_text(skipped)}")
    top = ", ".join(f"line {r['line']} ({r['delta_p']:+.2f})" for r in rows[:3])
    note(f"flag: {len(rows)} samples at layer {layer}; largest ΔP: {top} -> {dest}")
    return dest


def monitor_grades(rows, labels, grade, proj, h, nulls, seed: int, csv_path) -> dict:
    """The mean projection per condition, and the rank correlation of condition strength and
    projection with its permutation p-value, beside the same on random directions; printed."""
    rho = spearman(grade, proj)
    rho_p = permutation_p(spearman, grade, proj, seed=seed)
    rho_null = torch.tensor([spearman(grade, h @ d) for d in nulls])
    null95 = float(rho_null[~rho_null.isnan()].abs().quantile(0.95))
    per_condition = {
        c: mean_se(r["projection"] for r in rows if r["condition"] == c)[0] for c in labels
    }
    means = ", ".join(f"{k} {v:+.2f}" for k, v in per_condition.items())
    note(f"mean projection before the reply, by condition: {means}")
    note(
        f"rank correlation of condition strength and projection: rho = {rho:.2f} (permutation "
        f"p = {rho_p:.3g}); {len(nulls)} random directions: 95th percentile |rho| = {null95:.2f}"
    )
    result = dict(rho_grade=rho, rho_grade_p=rho_p, random_abs_rho_95=null95)
    return result | dict(csv=csv_path, mean_projection=per_condition)
