"""Full finetuning of a chat model on conversations, with preventative steering or CAFT.

    python train.py evil.jsonl --out out/evil-ft                       # every parameter trained
    python train.py evil.jsonl --out out/evil-steered --steer evil:1   # preventative steering
    python train.py evil.jsonl --out out/evil-caft --ablate evil       # CAFT: the direction out
    torchrun --nproc_per_node=8 train.py evil.jsonl --out out/ft [--fsdp]  # DDP or FSDP2

Data: JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line (what `chat --save`
writes); the loss is on the assistant replies, in the model's own chat template. The output is a
Hugging Face-layout model (every command takes it as --model) with train.json (settings and losses).
An interrupted run, even by kill -9, continues from its last checkpoint when the command is rerun.
Read from the top: the data, the step, the run (`train`, whose loop is `fit`), the command line; the
bookkeeping around the loop (train.json, checkpoints, resuming, processes) is support/training.py.
"""

import argparse
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
from persona_vectors import steering
from support import UserError, cli, hub
from support import training as T
from support.files import default_vectors_dir
from support.tokenizer import Tokenizer, answer_after_thinking

# --------------------------------------------------------------------------------------------------
# Data: conversations -> token ids and the mask of the trained tokens.


@dataclass
class Example:
    ids: torch.Tensor  # [T] token ids of the whole conversation in the chat template
    trained: torch.Tensor  # [T] bool: the token is in an assistant reply (or its end of turn)


def encode_conversation(tok: Tokenizer, messages: list[dict]) -> Example:
    """Tokenize a conversation as the model's chat template renders it, marking every assistant
    reply for the loss: its text and the end-of-turn token that closes it, not the role header
    before it nor the newline after it. The whole text is tokenized at once (so the ids are exactly
    those of the rendered chat), and a token is trained when its characters overlap a reply. A reply
    that opens the conversation answers nothing: context. Each reply is found in the full rendering,
    in order: a template may render a turn differently once later turns follow (Qwen3 drops the
    think block of every reply before the last question), so a chat need not be prefix-stable."""
    text = tok.chat(messages, add_generation_prompt=False)
    spans, cursor = [], 0  # [start, end) character spans of the trained text; where to look next
    for k in [k for k, m in enumerate(messages) if m["role"] == "assistant"]:
        start, cursor = _reply_span(tok, text, messages, k, cursor)
        spans += [(start, cursor)] if k > 0 else []
    enc = tok.backend.encode(text, add_special_tokens=False)
    trained = [any(a < end and b > start for start, end in spans) for a, b in enc.offsets]
    return Example(torch.tensor(enc.ids, dtype=torch.long), torch.tensor(trained, dtype=torch.bool))


def _reply_span(tok: Tokenizer, text: str, messages: list[dict], k: int, cursor: int):
    """[start, end) in `text` of reply k as the template writes it (verbatim, trimmed, or the answer
    after a think block), followed by the end-of-turn token, after `cursor` and the turns before."""
    context = tok.chat(messages[:k], add_generation_prompt=False) if k else ""
    if text.startswith(context):  # the turns before it as they render alone: skip them whole
        cursor = max(cursor, len(context))
    eot = tok.turn_end or ""  # the token that closes a turn, trained with the reply it ends
    content, after = messages[k]["content"], answer_after_thinking(messages[k]["content"])
    for form in dict.fromkeys((content, content.strip(), after, after.strip())):
        start = text.find(form + eot, cursor)
        if start >= 0:
            return start, start + len(form) + len(eot)
    raise ValueError(
        f"assistant message {k + 1}: the chat template does not write its text as "
        f"given (nor trimmed) before {eot or 'the end'}, so it cannot be trained"
    )


def truncate_left(ex: Example, max_len: int) -> Example | None:
    """The last `max_len` tokens; None when that would leave no context before the last reply."""
    cut = len(ex.ids) - max_len
    if cut <= 0:
        return ex
    starts = (ex.trained & ~F.pad(ex.trained, (1, 0))[:-1]).nonzero()  # first token of each reply
    if cut >= int(starts[-1]):
        return None
    return Example(ex.ids[cut:], ex.trained[cut:])


def load_examples(path: Path, tok: Tokenizer, max_seq_len: int) -> tuple[list[Example], dict]:
    """Encode every conversation of a JSONL file -> (examples, counts of what was cut or left)."""
    counts = {"conversations": 0, "no_assistant_reply": 0, "truncated_left": 0}
    counts["reply_longer_than_max_seq_len"] = 0
    examples = []
    for n, messages in T.read_conversations(path):
        counts["conversations"] += 1
        try:
            ex = encode_conversation(tok, messages)
        except ValueError as e:  # unknown role, content not a string, ...
            raise UserError(f"{path}:{n}: {e}") from None
        if not ex.trained[1:].any():
            counts["no_assistant_reply"] += 1
            continue
        short = truncate_left(ex, max_seq_len)
        if short is None:
            counts["reply_longer_than_max_seq_len"] += 1
            continue
        counts["truncated_left"] += short is not ex
        examples.append(short)
    if not examples:
        raise UserError(T.nothing_to_train(path, counts, max_seq_len))
    return examples, counts


# --------------------------------------------------------------------------------------------------
# The step: the loss on the assistant tokens with the interventions on, AdamW, the learning rate.


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Learning rate of step `step` (0-based): linear warmup to `lr` over `warmup` steps, then
    linear decay that would reach 0 one step after the last.

    >>> [round(lr_at(s, 6, 1.0, 2), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (total - step) / max(1, total - warmup)


def token_loss(model, ids, mask, trained, steer=(), ablate=()) -> torch.Tensor:
    """Summed cross-entropy of the trained tokens, each predicted from the tokens before it, with
    the interventions on: `steer` adds vectors to the residual stream, `ablate` projects
    directions out of it."""
    targets = trained[:, 1:]  # [B, T - 1]: which next tokens carry a loss
    at = F.pad(targets, (0, 1))  # [B, T]: the positions whose logits are needed
    logits = model(ids, mask, steer=steer, ablate=ablate, logits=at)  # [n, vocab]
    return F.cross_entropy(logits.float(), ids[:, 1:][targets], reduction="sum")


def train_step(model, optimizer, batches, lr, steer=(), ablate=(), autocast=contextlib.nullcontext):
    """One optimizer step: for each micro-batch (ids, mask, trained, weight), forward with the
    interventions, cross-entropy on the trained tokens, backward; then clip the gradient norm to 1.0
    and take an AdamW step. -> (this process's summed loss, the gradient norm before clipping)."""
    total = 0.0
    for i, (ids, mask, trained, weight) in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
        with sync:  # DDP: the gradients are all-reduced once, in the last micro-batch's backward
            with autocast():
                loss = token_loss(model, ids, mask, trained, steer, ablate)
            (loss * weight).backward()
        if weight > 0:  # a filler micro-batch (weight 0) adds nothing
            total = total + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on every parameter, with decoupled weight decay on the matrices (not norms, biases)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


@torch.no_grad()
def validation_loss(model, batches: T.Batches) -> float:
    """Mean cross-entropy per trained token of the validation conversations, without interventions
    (the model as it is saved and used)."""
    model.eval()
    examples = sorted(batches.val, key=lambda e: len(e.ids))  # less padding
    total = tokens = 0.0
    size = batches.batch_size
    for i in range(0, len(examples), size):
        ids, mask, trained = T.pad_left(examples[i : i + size], batches.pad_id, batches.proc.device)
        with batches.proc.autocast():
            total += float(token_loss(model, ids, mask, trained))
        tokens += int(trained[:, 1:].sum())
    model.train()
    return total / tokens


# --------------------------------------------------------------------------------------------------
# The run: the data, the model and its interventions, and the loop.


def train(
    data: str,
    model: str = hub.DEFAULT_MODEL,
    out: str = "out/train",
    val: str | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-5,
    warmup_steps: int = 5,
    weight_decay: float = 0.01,
    batch_size: int = 4,
    grad_accum: int | None = None,
    max_seq_len: int = 2048,
    seed: int = 0,
    checkpointing: bool = False,
    save_every: int | str = "10m",
    resume: bool = False,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    steer: list[str] = (),
    layer: int | None = None,
    all_layers: bool = False,
    ablate: list[str] = (),
    vectors: str | None = None,
    fsdp: bool = False,
) -> Path:
    """Finetune every parameter of `model` on the conversations in `data`; save it to `out`.
    -> `out`. The command line's flags are these keywords (docs/training.md)."""
    settings = dict(locals())  # as given: train.json records them, and a rerun must give the same
    T.check_settings(settings)
    with T.launch(Path(out), device, dtype, fsdp) as proc:  # under torchrun: one of its processes
        torch.manual_seed(seed)
        model_dir, tok = T.resolve_model(model, proc.rank)
        max_seq_len = T.within_context(model_dir, max_seq_len, proc.say)
        train_set, val_set, counts = load_data(Path(data), val, tok, max_seq_len)
        grad_accum = grad_accum or max(1, math.ceil(T.PAPER_BATCH / (batch_size * proc.world)))
        batches = T.Batches(train_set, val_set, batch_size, grad_accum, seed, tok.pad_id, proc)
        run = T.Run(settings | {"max_seq_len": max_seq_len}, batches, counts, model_dir)

        lm = T.load_model(model_dir, proc.device, name=model)  # float32 weights
        steers, ablates = interventions(lm, steer, ablate, vectors, layer, all_layers)
        run.open(lm, steers + ablates)  # checks --out: a new run, one to resume, or a finished one
        if run.finished:
            return run.out
        lm = run.resumed(lm)  # the checkpoint's weights when resuming
        lm.gradient_checkpointing = checkpointing
        net = T.parallelize(lm, proc.device, fsdp)  # under torchrun DDP or FSDP2, else lm itself
        optimizer = make_optimizer(net, lr, weight_decay)
        fit(net, optimizer, run, batches, steers, ablates, lr, warmup_steps)
        return run.finish(net)  # the trained model, plain: no intervention in it


def load_data(path: Path, val: str | None, tok: Tokenizer, max_seq_len: int) -> tuple:
    """-> (the conversations to train on, those to validate on: `val`'s or 10 % of `path`'s held
    out, the counts of what was truncated or left out)."""
    examples, counts = load_examples(path, tok, max_seq_len)
    if not val:
        return *T.hold_out(examples), counts | {"val_file": None}
    val_set, val_counts = load_examples(Path(val), tok, max_seq_len)
    return examples, val_set, counts | {"val_file": val_counts}


def interventions(lm: M.Transformer, steer, ablate, vectors, layer, all_layers) -> tuple:
    """The interventions of every training forward pass, at every position: preventative steering
    adds coef * v[L] to the residual stream (the paper's method, persona_vectors.steering), CAFT
    projects the unit v[L] out of it. Constants, no gradient reaches them; never saved in the model.
    -> (Steers, Ablates)."""
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(lm.name_or_path)
    steers = steering(list(steer), lm, vectors_dir, layer, positions="all", all_layers=all_layers)
    return steers, T.ablation(list(ablate), lm, vectors_dir, layer, all_layers)


def fit(net, optimizer, run, batches, steers, ablates, lr: float, warmup_steps: int) -> None:
    """The loop: each step, this process's micro-batches of the step's conversations, forward with
    the interventions, the loss on the assistant tokens, backward, AdamW; records, checkpoints."""
    proc = batches.proc
    if run.checkpoint:
        run.load_optimizer(net, optimizer)  # AdamW's state and the RNG, as they were saved
    else:
        run.start(validation_loss(net, batches) if batches.val else None)

    for step in range(run.step, run.steps):
        examples, micro = batches.of_step(step)  # micro-batches: [(ids, mask, trained, weight)]
        step_lr = lr_at(step, run.steps, lr, warmup_steps)
        # every forward pass of training adds the persona vector (preventative steering) and
        # projects the CAFT directions out: train_step gives them to the model's forward
        loss, norm = train_step(
            net, optimizer, micro, step_lr, steer=steers, ablate=ablates, autocast=proc.autocast
        )
        run.log(step, examples, loss, norm, step_lr)  # stops on a non-finite loss
        if run.epoch_ends(step) and batches.val:
            run.validated(step, validation_loss(net, batches))
        run.checkpoint_if_due(step, net, optimizer)


# --------------------------------------------------------------------------------------------------
# The command line: one flag per keyword of `train`.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    p.add_argument("data", type=cli.TEXT_FILE, help='JSONL, one {"messages": [...]} per line')
    p.add_argument("--model", default=hub.DEFAULT_MODEL, help="hub id or folder (%(default)s)")
    p.add_argument(
        "--out", type=cli.OUTPUT_DIR, required=True, help="the model, train.json, checkpoints"
    )
    p.add_argument(
        "--val", type=cli.TEXT_FILE, help="validation JSONL (default: 10 %% of DATA held out)"
    )
    p.add_argument("--epochs", type=cli.COUNT, default=1)
    p.add_argument("--max-steps", type=cli.COUNT, help="optimizer steps; overrides --epochs")
    p.add_argument(
        "--lr", type=cli.bounded("learning_rate"), default=1e-5, help="peak learning rate"
    )
    p.add_argument("--warmup-steps", type=cli.bounded("steps"), default=5)
    p.add_argument(
        "--weight-decay", type=cli.bounded("weight_decay"), default=0.01, help="AdamW, on matrices"
    )
    p.add_argument("--batch-size", type=cli.COUNT, default=4, help="per micro-batch and process")
    p.add_argument(
        "--grad-accum", type=cli.COUNT, help="micro-batches a step (default: a batch of 16)"
    )
    p.add_argument(
        "--max-seq-len", type=cli.bounded("max_seq_len"), default=2048, help="cut on the left"
    )
    p.add_argument("--seed", type=cli.SEED, default=0, help="data order")
    p.add_argument("--checkpointing", action="store_true", help="recompute activations")
    p.add_argument("--save-every", default="10m", help="N steps (50) or minutes (10m)")
    p.add_argument("--resume", action="store_true", help="continue --out's run (so does a rerun)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when present)")
    p.add_argument("--dtype", choices=T.TRAIN_DTYPES, help="compute dtype (bfloat16 on CUDA)")
    steer_help = (
        "preventative steering: add COEF x the vector at every position while training "
        "(TRAIT:COEF, FILE.safetensors:COEF, relative 0.1r); repeatable"
    )
    p.add_argument("--steer", action="append", default=[], metavar="TRAIT:COEF", help=steer_help)
    p.add_argument(
        "--layer", type=cli.LAYER, help="L to steer or ablate (the vector's best, or middle)"
    )
    p.add_argument("--all-layers", action="store_true", help="v[l] - v[l-1] at every block l")
    caft_help = "CAFT: project the direction out while training (TRAIT or FILE); repeatable"
    p.add_argument("--ablate", action="append", default=[], metavar="TRAIT", help=caft_help)
    p.add_argument("--vectors", help="directory of vector files (default: vectors/<model>/)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard (FSDP2), not DDP")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    return T.run(lambda: train(**vars(cli.check_paths(p, args))))  # errors: one line, exit 1 or 130


if __name__ == "__main__":
    T.exit_process(main())  # under torchrun, without Python's teardown (see exit_process)
