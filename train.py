"""Full finetuning of a chat model on conversations, with preventative steering or CAFT, on one or many devices.

    python train.py evil.jsonl --out out/evil-ft                            # every parameter trained
    python train.py evil.jsonl --out out/evil-steered --steer evil:1        # preventative steering
    python train.py evil.jsonl --out out/evil-caft --ablate evil            # CAFT: the direction projected out
    torchrun --nproc_per_node=8 train.py evil.jsonl --out out/ft [--fsdp]   # data parallel, or sharded (FSDP2)

Data: JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line (what `chat --save` writes). The loss
is taken on the assistant replies only, in the model's own chat template. The output directory is a Hugging
Face-layout model (every command takes it as --model) with train.json (settings and losses); a run that was
interrupted, even by kill -9, continues from its last checkpoint when the same command is run again.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
import persona_vectors as pv
from support import UserError, checkpoint, generation as G, hub
from support.files import default_vectors_dir
from support.tokenizer import Tokenizer
from support.training import (PAPER_BATCH, ablation, add_arguments, all_sum, check_numbers, checkpoints,
                              compute_dtype, duration, fingerprint, join_device, load_checkpoint, load_optimizer,
                              open_run, parallelize, parse_save_every, process_group, read_conversations,
                              removed_if_left_empty, resolve_model, save_checkpoint, save_final, sha256_file,
                              write_json)

# ---------------------------------------------------------------------------------------------------------------
# Data: conversations -> token ids and the mask of trained tokens.

@dataclass
class Example:
    ids: torch.Tensor  # [T] token ids of the whole conversation in the chat template
    trained: torch.Tensor  # [T] bool: the token belongs to an assistant reply (its end-of-turn token included)


def encode_conversation(tok: Tokenizer, messages: list[dict]) -> Example:
    """Tokenize a conversation as the model's chat template renders it, marking every assistant reply for the loss:
    its text and the end-of-turn token that closes it, not the role header before it nor the newline after it.
    The whole text is tokenized at once (so the ids are exactly those of the rendered chat), and a token is
    trained when its characters overlap a reply. A reply that opens the conversation answers nothing: context."""
    text = tok.chat(messages, add_generation_prompt=False)
    eot = tok.turn_end  # the token that closes a turn, trained with the reply it ends
    spans = []  # [start, end) character spans of the trained text
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k == 0:
            continue
        prompt = tok.chat(messages[:k], add_generation_prompt=True)  # everything before the reply, header included
        upto = tok.chat(messages[:k + 1], add_generation_prompt=False)
        assert text.startswith(upto) and upto.startswith(prompt), "chat rendering is not prefix-stable"
        spans.append((len(prompt), upto.rindex(eot) + len(eot)))
    enc = tok.backend.encode(text, add_special_tokens=False)
    trained = [any(a < end and b > start for start, end in spans) for a, b in enc.offsets]
    return Example(torch.tensor(enc.ids, dtype=torch.long), torch.tensor(trained, dtype=torch.bool))


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
    """Encode every conversation of a JSONL file -> (examples, counts of what was truncated or left out and why)."""
    counts = {"conversations": 0, "no_assistant_reply": 0, "truncated_left": 0, "reply_longer_than_max_seq_len": 0}
    examples = []
    for n, messages in read_conversations(path):
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
        raise UserError(f"{path}: no conversation to train on ({counts['no_assistant_reply']} without an assistant "
                        f"reply, {counts['reply_longer_than_max_seq_len']} whose last reply alone exceeds "
                        f"--max-seq-len {max_seq_len})")
    return examples, counts


def hold_out(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """-> (train, validation): a fixed 10 % of the conversations, the same whatever --seed, so runs compare."""
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = len(examples) // 10
    return [examples[i] for i in sorted(perm[n_val:])], [examples[i] for i in sorted(perm[:n_val])]


def pad_left(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """-> ids [B, T], attention mask [B, T] (None when no row is padded), trained [B, T]; rows left-padded."""
    ids, mask = G.left_pad([e.ids for e in examples], pad_id)
    trained = G.left_pad([e.trained for e in examples])[0].bool()
    return ids.to(device), None if mask.all() else mask.to(device), trained.to(device)


def step_examples(examples: list[Example], step: int, global_batch: int, seed: int) -> list[Example]:
    """The conversations of optimizer step `step` (0-based). Epoch e visits them in the e-th permutation drawn
    from a generator seeded with `seed`: the order is a function of (seed, step), so a resumed run sees the same."""
    per_epoch = math.ceil(len(examples) / global_batch)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epoch + 1):
        order = torch.randperm(len(examples), generator=g).tolist()
    return [examples[j] for j in order[i * global_batch:(i + 1) * global_batch]]


def my_micro_batches(examples: list[Example], rank: int, world: int, grad_accum: int) -> list[tuple[list, float]]:
    """Split a step's conversations, sorted by length (less padding), into world x grad_accum micro-batches and
    return this process's grad_accum of them, each with its loss weight: world / trained tokens of the whole step,
    so that the summed and (by DDP or FSDP) averaged gradient is that of the mean loss per trained token. A
    micro-batch that a short last step leaves empty repeats a conversation at weight 0: every process must run the
    same number of forward passes."""
    tokens = sum(int(e.trained[1:].sum()) for e in examples)
    slots = world * grad_accum
    examples = sorted(examples, key=lambda e: len(e.ids))
    size = math.ceil(len(examples) / slots)
    parts = [examples[j * size:(j + 1) * size] for j in range(slots)]  # micro-batch m of rank r: part m * world + r
    return [(parts[j], world / tokens) if parts[j] else (examples[:1], 0.0) for j in range(rank, slots, world)]


# ---------------------------------------------------------------------------------------------------------------
# The training step.

def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Learning rate of step `step` (0-based): linear warmup to `lr` over `warmup` steps, then linear decay that
    would reach 0 one step after the last.

    >>> [round(lr_at(s, 6, 1.0, 2), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (total - step) / max(1, total - warmup)


def token_loss(model, ids, mask, trained, steer=(), ablate=()) -> torch.Tensor:
    """Summed cross-entropy of the trained tokens, each predicted from the tokens before it, interventions on."""
    targets = trained[:, 1:]  # [B, T - 1]: which next tokens carry a loss
    logits = model(ids, mask, steer=steer, ablate=ablate, logits=F.pad(targets, (0, 1)))  # [n, vocab]
    return F.cross_entropy(logits.float(), ids[:, 1:][targets], reduction="sum")


def train_step(model, optimizer, batches, lr: float, steer=(), ablate=(), autocast=contextlib.nullcontext):
    """One optimizer step: for each micro-batch (ids, mask, trained, weight), forward with the interventions,
    cross-entropy on the trained tokens, backward; then clip the gradient norm to 1.0 and take an AdamW step.
    -> (this process's summed loss, the gradient norm before clipping)."""
    total = 0.0
    for i, (ids, mask, trained, weight) in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():  # DDP: sync once
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
    """AdamW on every parameter, with decoupled weight decay on the matrices (norm weights and biases undecayed)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


@torch.no_grad()
def validation_loss(model, examples: list[Example], batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean cross-entropy per trained token, without interventions (the model as it is saved and used)."""
    model.eval()
    examples = sorted(examples, key=lambda e: len(e.ids))  # less padding
    total = tokens = 0.0
    for i in range(0, len(examples), batch_size):
        ids, mask, trained = pad_left(examples[i:i + batch_size], pad_id, device)
        with autocast():
            total += float(token_loss(model, ids, mask, trained))
        tokens += int(trained[:, 1:].sum())
    model.train()
    return total / tokens


# ---------------------------------------------------------------------------------------------------------------
# Interventions during training: steering (persona_vectors.steering, at every position) and CAFT (a direction
# projected out, support.training.ablation).

def interventions(model: M.Transformer, steer: list[str], ablate: list[str], vectors, layer, all_layers):
    """-> (Steer list, Ablate list) for training: at every position, constant vectors (no gradient reaches them)."""
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model.name_or_path)
    steers = pv.steering(list(steer), model, vectors_dir, layer, positions="all", all_layers=all_layers)
    return steers, ablation(list(ablate), model, vectors_dir, layer, all_layers)


# ---------------------------------------------------------------------------------------------------------------
# The run.

def train(data: str, model: str = hub.DEFAULT_MODEL, out: str = "out/train", val: str | None = None, epochs: int = 1,
          max_steps: int | None = None, lr: float = 1e-5, warmup_steps: int = 5, weight_decay: float = 0.01,
          batch_size: int = 4, grad_accum: int | None = None, max_seq_len: int = 2048, seed: int = 0,
          checkpointing: bool = False, save_every: int | str = "10m", resume: bool = False, device: str | None = None,
          dtype: str | torch.dtype | None = None, steer: list[str] = (), layer: int | None = None,
          all_layers: bool = False, ablate: list[str] = (), vectors: str | None = None, fsdp: bool = False) -> Path:
    """Finetune every parameter of `model` on the conversations in `data` and save it to `out` -> `out`.

    steer: --steer specs (TRAIT:COEF, FILE.safetensors:COEF, relative 0.1r) added at every position of every
    training forward pass, never at inference: the saved weights are plain. ablate: traits or vector files whose
    direction is projected out (CAFT). grad_accum: default, whatever makes the global batch 16 (the paper's).
    Under torchrun, data parallel (or sharded with fsdp) with `batch_size` per process; train joins the process
    group and leaves it at the end, or uses the caller's when one is set up (do that to call train more than once).
    """
    check_numbers(epochs=epochs, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, batch_size=batch_size,
                  grad_accum=grad_accum or 1, max_seq_len=max_seq_len, max_steps=max_steps or 1)
    save_steps, save_seconds = parse_save_every(save_every)
    device = device or checkpoint.default_device()
    dtype = compute_dtype(dtype, device)
    out, data = Path(out), Path(data)
    with process_group(device) as (rank, world), removed_if_left_empty(out):
        dev = join_device(device, fsdp, world)
        say = (lambda *a, **k: print(*a, file=sys.stderr, flush=True, **k)) if rank == 0 else (lambda *a, **k: None)
        torch.manual_seed(seed)

        def autocast():  # bf16 compute on the fp32 weights; no cache of cast weights (a bf16 copy of the model)
            return torch.autocast(dev.type, dtype, enabled=dtype != torch.float32, cache_enabled=False)

        # data
        model_dir, tok = resolve_model(model, rank)
        context = checkpoint.read_config(model_dir / "config.json", M.Config).max_position_embeddings
        if max_seq_len > context:
            say(f"--max-seq-len {max_seq_len} is past the model's context ({context} tokens, "
                f"max_position_embeddings): training on at most {context}")
            max_seq_len = context
        examples, counts = load_examples(data, tok, max_seq_len)
        if val:
            train_set, (val_set, val_counts) = examples, load_examples(Path(val), tok, max_seq_len)
        else:
            train_set, val_set = hold_out(examples)
            val_counts = None
        grad_accum = grad_accum or max(1, math.ceil(PAPER_BATCH / (batch_size * world)))
        global_batch = batch_size * grad_accum * world
        per_epoch = math.ceil(len(train_set) / global_batch)
        total = max_steps or epochs * per_epoch
        trained_tokens = sum(int(e.trained[1:].sum()) for e in train_set)
        held = f"{len(val_set)} to validate on" + ("" if val else " (10 % held out)" if val_set else
                                                   " (fewer than 10 conversations: give --val FILE)")
        say(f"data: {len(train_set)} conversations to train on ({trained_tokens} trained tokens), {held}; "
            f"{counts['no_assistant_reply']} skipped (no assistant reply), {counts['truncated_left']} truncated from "
            f"the left to --max-seq-len {max_seq_len}, {counts['reply_longer_than_max_seq_len']} left out (last "
            "reply alone longer)")
        say(f"{total} steps of {global_batch} conversations ({world} process{'es' if world > 1 else ''} x batch "
            f"{batch_size} x {grad_accum} accumulated), {per_epoch} steps per epoch")

        # model and interventions
        try:
            lm = M.load_model(model_dir, dev, torch.float32)  # fp32 master weights; autocast computes in bf16
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        lm.name_or_path = model
        steers, ablates = interventions(lm, steer, ablate, vectors, layer, all_layers)
        settings = {"model": model, "data_sha256": sha256_file(data),
                    "val_sha256": sha256_file(Path(val)) if val else None, "epochs": epochs,
                    "max_steps": max_steps, "lr": lr, "warmup_steps": warmup_steps,
                    "weight_decay": weight_decay, "global_batch": global_batch, "max_seq_len": max_seq_len,
                    "seed": seed, "dtype": str(dtype).removeprefix("torch."), "steer": list(steer),
                    "ablate": list(ablate), "layer": layer, "all_layers": all_layers,
                    "interventions_sha256": fingerprint(steers, ablates)}
        record, ckpt = open_run(out, settings, resume, rank)
        if record is not None and record["status"] == "done":
            say(f"{out} already holds this finished run")
            return out
        if ckpt is not None:
            lm = None  # the base weights go before the checkpoint's come
            lm, record = load_checkpoint(ckpt, dev)
            say(f"resuming from {ckpt} (step {record['step']} of {total})")
        else:
            record = {"settings": settings, "status": "running", "step": 0, "steps": total,
                      "data": {"train": str(data), "val": val, "train_conversations": len(train_set),
                               "val_conversations": len(val_set), "trained_tokens": trained_tokens, **counts,
                               "val_file": val_counts},
                      "log": [], "val_loss": []}
        record["world_size"] = world  # of this session (a resumed run may use another)
        record["parallel"] = ("fsdp" if fsdp else "ddp") if dist.is_initialized() else None
        lm.gradient_checkpointing = checkpointing
        lm.train()
        config = json.loads((model_dir / "config.json").read_text()) | {
            "tie_word_embeddings": lm.config.tie_word_embeddings}
        net = parallelize(lm, dev, fsdp)
        optimizer = make_optimizer(net, lr, weight_decay)
        if ckpt is not None:
            load_optimizer(net, optimizer, ckpt)
        elif val_set:
            record["val_loss"].append({"step": 0, "epoch": 0, "loss": validation_loss(
                net, val_set, batch_size, tok.pad_id, dev, autocast)})
            say(f"validation loss before training: {record['val_loss'][-1]['loss']:.4f}")
        if rank == 0 and ckpt is None:
            write_json(out / "train.json", record)

        # the loop
        t_start, t_saved, done_here, tokens_here = time.time(), time.time(), 0, 0
        for step in range(record["step"], total):
            exs = step_examples(train_set, step, global_batch, seed)
            batches = [(*pad_left(mb, tok.pad_id, dev), w)
                       for mb, w in my_micro_batches(exs, rank, world, grad_accum)]
            step_lr = lr_at(step, total, lr, warmup_steps)
            loss, norm = train_step(net, optimizer, batches, step_lr, steers, ablates, autocast)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
            want_save = save_steps is not None and (step + 1) % save_steps == 0 or (
                save_seconds is not None and time.time() - t_saved > save_seconds)
            loss_sum, want_save = all_sum([float(loss), float(want_save)], dev)
            step_tokens = sum(int(e.trained[1:].sum()) for e in exs)
            loss = loss_sum / step_tokens
            if not (math.isfinite(loss) and math.isfinite(norm)):
                say("")  # end the progress line
                last = checkpoints(out)
                raise UserError(f"non-finite loss at step {step + 1}: stopped; the last good checkpoint "
                                f"({last[-1] if last else 'none'}) is kept. Lower --lr or the --steer coefficient, or "
                                "check the data, then rerun")
            done_here += 1
            tokens_here += sum(len(e.ids) for e in exs)
            elapsed = time.time() - t_start
            say(f"\rstep {step + 1}/{total}  loss {loss:.4f}  lr {step_lr:.2e}  {tokens_here / elapsed:,.0f} tok/s  "
                f"ETA {duration(elapsed / done_here * (total - step - 1))}\033[K", end="")
            record["log"].append({"step": step + 1, "loss": loss, "lr": step_lr, "grad_norm": norm})
            record["step"] = step + 1
            epoch_end = (step + 1) % per_epoch == 0 or step + 1 == total
            if epoch_end and val_set:
                v = validation_loss(net, val_set, batch_size, tok.pad_id, dev, autocast)
                record["val_loss"].append({"step": step + 1, "epoch": round((step + 1) / per_epoch, 3), "loss": v})
                say(f"\nepoch {(step + 1) / per_epoch:g}: validation loss {v:.4f}")
            if want_save and step + 1 < total:
                save_checkpoint(out, net, optimizer, config, record, rank)
                t_saved = time.time()
        say("")

        save_final(net, config, model_dir, out, record, rank)  # the trained model, plain: no intervention in it
        say(f"saved {out} (train.json: settings and losses)")
        return out


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        train(**vars(args))
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print("error: out of memory: lower --batch-size (raise --grad-accum to keep the batch) or --max-seq-len, "
              "or add --checkpointing, or shard with --fsdp", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
