"""Persona capping's calibration: where the model's own everyday answers sit along a trait's vector,
per layer.

    python -m apps calibrate-cap evil      # -> vectors/<model>/evil_response_avg_diff.cap.json

The model answers everyday requests (data/questions/everyday.json; no system prompt, greedy); every
answer token's state at every hidden index is projected on that index's unit vector, and the
percentiles of those projections are the ceilings a cap reads (support/capping.py has the file
format and the --cap specs; docs/capping.md the study behind the defaults).
"""

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import model as M
import persona_vectors as pv
from support import UserError, checkpoint, cli, records
from support.capping import ceiling_path, percentile_table, vector_sha256, write_ceilings
from support.files import check_fits, check_output, default_vectors_dir, load_vector, vector_file
from support.hub import DEFAULT_MODEL
from support.sampling import check_count, check_new_tokens
from support.traits import QUESTIONS_FILE, load_questions


@torch.no_grad()
def answer_projections(
    model: M.Transformer, prompts: list[list[int]], answers: list[list[int]], units: torch.Tensor
) -> list[np.ndarray]:
    """Each answer token's projection at every hidden index, as the plain model reads prompt +
    answer.

    units: [N + 1, hidden] unit vectors -> per answer an array [answer tokens, N + 1]."""
    device = model.lm_head.weight.device
    # every answer ends in the last column
    ids, mask = M.left_pad([p + a for p, a in zip(prompts, answers)])
    T = ids.shape[1]
    N = model.config.num_hidden_layers
    cap = M.Capture(token_layers=tuple(range(N + 1)))
    model(ids.to(device), mask.to(device), capture=cap, logits="none")
    units = units.float().to(device)
    proj = torch.stack(
        [cap.tokens[l][0] @ units[l] for l in range(N + 1)], -1
    ).cpu()  # [B, T, N + 1]
    return [proj[b, T - len(a) :].numpy() for b, a in enumerate(answers)]


def check_beside(vec_file: Path, dest: Path) -> None:
    """Fail now when the vector's folder, where its ceiling file goes (--cap finds it there), cannot
    be written."""
    try:
        with tempfile.TemporaryFile(dir=vec_file.parent):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write the ceiling file {dest.name} beside its vector in {vec_file.parent} "
            f"({e.strerror}): copy the vector into a folder you can write to and pass that folder "
            "as --vectors (or the copied .safetensors file as the trait, and to --cap)"
        ) from None


def calibrate_cap(
    trait: str,
    questions_file: str | None = None,
    n: int = 100,
    max_new_tokens: int = 96,
    batch_size: int = 32,
    force: bool = False,
    model: str = DEFAULT_MODEL,
    vectors: str | None = None,
    device: str | None = None,
    dtype=None,
) -> Path:
    """Answer n everyday requests (greedy, no system prompt) and write the percentiles of every
    answer token's projection at every hidden index beside the trait's vector -> the ceiling
    file."""
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model)
    vec_file = vector_file(trait, vectors_dir)
    dest = ceiling_path(vec_file)
    if dest.exists() and not force:
        raise UserError(f"{dest} exists: pass --force to calibrate again")
    check_beside(vec_file, dest)
    check_output(dest, True, inputs=[vec_file, questions_file], option="ceiling file")
    check_count("n", n)
    questions = load_questions(questions_file)[:n]
    vec, meta = load_vector(vec_file)
    checkpoint.check_device(device or checkpoint.default_device())
    lm, tok = checkpoint.load(model, device, dtype)
    check_fits(vec, meta, vec_file, lm.config.num_hidden_layers, lm.config.hidden_size, lm)
    check_new_tokens(lm, max_new_tokens)  # before any answer; each batch: in generate
    units = pv.unit(vec)
    print(
        f"calibrate-cap {vec_file.name}: {len(questions)} requests from "
        f"{questions_file or QUESTIONS_FILE}, greedy, up to {max_new_tokens} tokens",
        file=sys.stderr,
    )
    proj, t0 = [], time.time()
    for i in range(0, len(questions), batch_size):
        prompts = [
            tok.encode_chat(pv.conversation(dict(system=None, question=q)))
            for q in questions[i : i + batch_size]
        ]
        answers = M.generate(lm, prompts, max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
        proj += answer_projections(lm, prompts, answers, units)
        print(
            f"calibrate-cap: {min(i + batch_size, len(questions))}/{len(questions)} answers "
            f"({time.time() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    tokens = np.concatenate(proj)  # [all answer tokens, N + 1]
    qfile = Path(questions_file) if questions_file else QUESTIONS_FILE
    record = dict(
        trait=meta.get("trait", trait),
        model=lm.name_or_path,
        model_path=str(lm.source_dir),
        model_source=getattr(lm, "source", None),
        vector=vec_file.name,
        vector_sha256=vector_sha256(vec),
        questions_file=str(qfile),
        questions_sha256=hashlib.sha256(qfile.read_bytes()).hexdigest(),
        answers=len(proj),
        tokens=len(tokens),
        max_new_tokens=max_new_tokens,
        system_prompt=None,
        temperature=0.0,
        layer_convention=records.LAYER_CONVENTION,
    ) | percentile_table(tokens)
    write_ceilings(dest, record)
    L = meta.get("best_layer", lm.config.num_hidden_layers // 2)
    c = record["ceilings"]
    print(
        f"calibrate-cap: {len(tokens)} answer tokens; at layer {L} the projections' median "
        f"is {c[49][L]:.2f}, 90th percentile {c[89][L]:.2f}, 99th {c[98][L]:.2f} -> {dest}",
        file=sys.stderr,
    )
    return dest


def add_commands(sub) -> None:
    """Register `calibrate-cap` on an argparse subparsers object (python -m apps)."""
    c = sub.add_parser(
        "calibrate-cap",
        help="ceilings for persona capping: percentiles of the "
        "model's own everyday answers along a trait's vector, per layer",
    )
    c.add_argument(
        "trait", help="a trait with a vector in --vectors, or a vector .safetensors file"
    )
    c.add_argument(
        "--questions-file",
        type=cli.TEXT_FILE,
        default=None,
        help="requests: .json list or one per line (default: data/questions/everyday.json)",
    )
    c.add_argument(
        "--n",
        type=cli.COUNT,
        default=100,
        help="how many requests, from the first (default: %(default)s)",
    )
    c.add_argument(
        "--max-new-tokens", type=cli.MAX_NEW_TOKENS, default=96, help="default: %(default)s"
    )
    c.add_argument("--batch-size", type=cli.COUNT, default=32, help="default: %(default)s")
    c.add_argument("--force", action="store_true", help="replace an existing ceiling file")
    c.add_argument("--model", default=DEFAULT_MODEL, help=cli.HELP["model"])
    c.add_argument("--vectors", default=None, help=cli.HELP["vectors"])
    c.add_argument("--device", default=None, help=cli.HELP["device"])
    c.add_argument("--dtype", type=cli.torch_dtype, default=None, help=cli.HELP["dtype"])
    c.set_defaults(
        run=lambda a: calibrate_cap(
            a.trait,
            questions_file=a.questions_file,
            n=a.n,
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            force=a.force,
            model=a.model,
            vectors=a.vectors,
            device=a.device,
            dtype=a.dtype,
        )
    )
