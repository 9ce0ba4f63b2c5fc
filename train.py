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
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
from support import UserError, hub
from support.files import (atomic_write, check_fits, check_writable, default_vectors_dir, load_vector, resolve_layer,
                           vector_path)
from support.tokenizer import Tokenizer

TURN_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}  # closes every turn; trained with the reply it ends
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PAPER_BATCH = 16  # the paper's effective batch: --grad-accum defaults to what reaches it
SHARD_BYTES = 5 * 2**30  # weight files above this are split into shards, as Hugging Face does


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
    eot = TURN_END[tok.family]
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


def read_conversations(path: Path) -> list[tuple[int, list]]:
    """(line number, messages) for each non-blank line of a JSONL file; any malformed line is an error naming it."""
    if not path.is_file():
        raise UserError(f"no data file {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): is it a JSONL file?") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg}, column {e.colno}): each line must be one "
                            '{"messages": [...]} object') from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UserError(f'{path}:{n}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}, '
                            f"got {line[:60]!r}")
        out.append((n, messages))
    if not out:
        raise UserError(f'{path} holds no conversations: write one {{"messages": [...]}} object per line')
    return out


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
    B, T = len(examples), max(len(e.ids) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    trained = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, T - len(e.ids):], mask[b, T - len(e.ids):], trained[b, T - len(e.ids):] = e.ids, True, e.trained
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
# Interventions during training: steering (added at every position) and CAFT (a direction projected out).

def ablation(specs: list[str], model: M.Transformer, vectors_dir: Path, layer: int | None,
             all_layers: bool) -> list[M.Ablate]:
    """CAFT: project the unit persona direction out of the residual stream at the steering layer (`layer`, else the
    vector's best layer, else the middle), or with `all_layers` out of every block's output (v[l] at block l)."""
    N, d = model.config.num_hidden_layers, model.config.hidden_size
    out = []
    for spec in specs:
        path = Path(spec) if spec.endswith(".safetensors") else vector_path(vectors_dir, spec)
        vec, meta = load_vector(path)
        check_fits(vec, meta, path, N, d)
        L = resolve_layer(layer, meta, N)
        vec = vec.to(model.lm_head.weight.device)
        out += [M.Ablate(l, vec[l], "all") for l in (range(1, N + 1) if all_layers else [L])]
    return out


def interventions(model: M.Transformer, steer: list[str], ablate: list[str], vectors, layer, all_layers):
    """-> (Steer list, Ablate list) for training: at every position, constant vectors (no gradient reaches them)."""
    import persona_vectors as pv  # here, not at the top: persona_vectors.py imports this module for its `train`
    vectors_dir = Path(vectors) if vectors else default_vectors_dir(model.name_or_path)
    steers = pv.steering(list(steer), model, vectors_dir, layer, positions="all", all_layers=all_layers)
    return steers, ablation(list(ablate), model, vectors_dir, layer, all_layers)


def fingerprint(steers, ablates) -> str:
    """sha256 of the interventions as applied (layers, coefficients, vector values): a re-extracted vector counts
    as a changed setting when resuming."""
    h = hashlib.sha256()
    for x in list(steers) + list(ablates):
        v = x.vector if isinstance(x, M.Steer) else x.direction
        h.update(f"{type(x).__name__} {x.layer} {getattr(x, 'coef', 1.0)!r};".encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Files: the output model, checkpoints, the run record.

def save_model(weights: dict, config: dict, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json and the weights (fp32) as model.safetensors, or as shards with an index past shard_bytes:
    the Hugging Face layout that model.load and transformers both read."""
    config = dict(config) | {k: "float32" for k in ("torch_dtype", "dtype") if k in config}
    if config.get("tie_word_embeddings"):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # one tensor, stored once
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    shards, size = [[]], 0
    for k, v in weights.items():
        if shards[-1] and size + v.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += v.nbytes
    out.mkdir(parents=True, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        atomic_write(out / name, lambda p: save_file({k: weights[k] for k in keys}, p, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        write_json(out / "model.safetensors.index.json", index)
    write_json(out / "config.json", config)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Every file of the source model directory but its weights, config and run record (tokenizer, template,
    generation config, license)."""
    for f in sorted(src.iterdir()):
        weights = f.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json"))
        if f.is_file() and not weights and f.name not in ("config.json", "train.json") and not f.name.startswith("."):
            shutil.copyfile(f, dst / f.name)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (a checkpoint appears by renaming a finished directory)."""
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir())


def leftover(path: Path) -> bool:
    """Whether a file or folder in an output directory is what a killed run left: the temporary of an atomic write
    (.NAME.XXXX.tmp), or a checkpoint being written (.checkpoint-N.tmp) or removed (.checkpoint-N.trash)."""
    return path.name.startswith(".") and path.name.endswith((".tmp", ".trash"))


def remove_leftovers(out: Path) -> None:
    for p in out.iterdir():
        if leftover(p):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@contextlib.contextmanager
def removed_if_left_empty(out: Path):
    """On a failure, remove `out` and the parents made for it while they are empty: a run that fails before writing
    anything leaves no trace, and nothing that existed before it started is removed."""
    made = [p for p in [out, *out.parents] if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for d in made:
            try:
                d.rmdir()  # only ever an empty directory
            except OSError:
                break
        raise


def remove(checkpoint: Path) -> None:
    """Renamed out of the way first: a removal cut short leaves no half checkpoint under a checkpoint's name."""
    trash = checkpoint.parent / f".{checkpoint.name}.trash"
    os.replace(checkpoint, trash)
    shutil.rmtree(trash)


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded) state dicts keyed by parameter name, on the CPU, for DDP, FSDP2 or a plain module alike;
    in a process group only rank 0 receives them."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    weights = get_model_state_dict(model, options=options)
    return weights, None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(out: Path, model, optimizer, config: dict, record: dict, rank: int) -> Path:
    """checkpoint-STEP/: the weights (a loadable model), the optimizer state and RNG, and the run record. It is
    written under a temporary name and renamed when complete, then the older checkpoints are removed."""
    weights, optim = full_state(model, optimizer)
    final = out / f"checkpoint-{record['step']:06d}"
    if rank == 0:
        tmp = out / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(weights, config, tmp)
        torch.save({"optimizer": optim, "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        write_json(tmp / "state.json", record)
        os.replace(tmp, final)
        write_json(out / "train.json", record)
        for old in checkpoints(out)[:-1]:
            remove(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def check_out(out: Path, settings: dict, resume: bool) -> dict | None:
    """-> the record of this same run when `out` holds it (to resume, or already done); None for a fresh start.
    Anything else in `out` is refused: another run's settings, or files that are not a run."""
    path = out / "train.json"
    if not path.is_file():
        if resume:
            raise UserError(f"--resume: {out} holds no training run; run without --resume to start one")
        if out.is_dir() and not all(leftover(p) for p in out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no training run: choose a new or empty directory")
        return None
    record = json.loads(path.read_text())
    old = record["settings"]
    changed = [k for k in {**old, **settings} if old.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        what = f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" + (
            f", and {len(changed) - 1} more" if len(changed) > 1 else "")
        if resume:
            raise UserError(f"--resume with changed settings ({what}): rerun with the original settings, or choose "
                            "another --out to start a new run")
        raise UserError(f"--out {out} holds a different run ({what}): choose another --out, or rerun with that "
                        "run's settings to resume it")
    return record


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# One or many processes.

@contextlib.contextmanager
def process_group(device: str):
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on the CPU) -> (rank, world size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def parallelize(model: M.Transformer, device: torch.device, fsdp: bool):
    """PyTorch's own data parallelism: DDP (a full replica per process, gradients all-reduced) or FSDP2 (parameters,
    gradients and optimizer state sharded across the processes, each block gathered when it runs)."""
    if not dist.is_initialized():
        return model
    if fsdp:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    # gradient_as_bucket_view: the gradients are views of the all-reduce buffers, not a second copy
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def parse_save_every(save_every) -> tuple[int | None, float | None]:
    """'50' -> every 50 steps; '10m' -> every 10 minutes (of training time) -> (steps, seconds)."""
    s = str(save_every).strip()
    try:
        if s.endswith("m"):
            minutes = float(s[:-1])
            if minutes > 0:
                return None, minutes * 60
        elif int(s) > 0:
            return int(s), None
    except ValueError:
        pass
    raise UserError(f"--save-every {save_every!r}: give a number of steps (50) or of minutes (10m)")


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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
    for name, value, low in (("--epochs", epochs, 1), ("--lr", lr, 1e-300), ("--warmup-steps", warmup_steps, 0),
                             ("--weight-decay", weight_decay, 0), ("--batch-size", batch_size, 1),
                             ("--grad-accum", grad_accum or 1, 1), ("--max-seq-len", max_seq_len, 2),
                             ("--max-steps", max_steps or 1, 1)):
        if not value >= low:
            raise UserError(f"{name} {value} must be at least {low:g}")
    save_steps, save_seconds = parse_save_every(save_every)
    device = device or M.default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype}: training computes in float32 or bfloat16 (float16 would need loss "
                            "scaling)")
        dtype = DTYPES[dtype]
    dtype = dtype or M.default_dtype(device)
    out, data = Path(out), Path(data)
    with process_group(device) as (rank, world), removed_if_left_empty(out):
        if fsdp and world == 1 and not dist.is_initialized():
            raise UserError("--fsdp shards across processes: launch with torchrun --nproc_per_node=K train.py ...")
        dev = torch.device(device)
        if dev.type == "cuda" and dist.is_initialized():
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        say = (lambda *a, **k: print(*a, file=sys.stderr, flush=True, **k)) if rank == 0 else (lambda *a, **k: None)
        torch.manual_seed(seed)

        def autocast():  # bf16 compute on the fp32 weights; no cache of cast weights (a bf16 copy of the model)
            return torch.autocast(dev.type, dtype, enabled=dtype != torch.float32, cache_enabled=False)

        # data
        try:
            if rank > 0:
                dist.barrier()  # rank 0 downloads the model first; the others then find it in the cache
            model_dir = hub.resolve(model, verbose=rank == 0)
            if rank == 0 and dist.is_initialized():
                dist.barrier()
            tok = Tokenizer(model_dir)
        except (ValueError, FileNotFoundError, hub.HubError) as e:
            raise UserError(str(e)) from None
        context = M.Config.from_json(model_dir / "config.json").max_position_embeddings
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
        if rank == 0:
            check_writable(out)
        record = check_out(out, settings, resume)
        if dist.is_initialized():
            dist.barrier()  # every process has read `out` before rank 0 writes to it
        done = record is not None and record["status"] == "done"
        if rank == 0:
            remove_leftovers(out)  # of a run killed while it wrote or removed a file
            for old in checkpoints(out) if done else []:  # killed after its last save, before this removal
                remove(old)
        if done:
            say(f"{out} already holds this finished run")
            return out
        ckpt = checkpoints(out)[-1] if record is not None and checkpoints(out) else None
        if ckpt is not None:
            lm = None  # the base weights go before the checkpoint's come
            lm = M.load_model(ckpt, dev, torch.float32)
            record = json.loads((ckpt / "state.json").read_text())
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
            state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
            set_optimizer_state_dict(net, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
            torch.set_rng_state(state["rng"])
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

        # the trained model, plain (no intervention is part of it)
        weights, _ = full_state(net)
        if rank == 0:
            save_model(weights, config, out)
            copy_tokenizer_files(model_dir, out)
            record["status"] = "done"
            write_json(out / "train.json", record)
            for old in checkpoints(out):
                remove(old)
            say(f"saved {out} (train.json: settings and losses)")
        if dist.is_initialized():
            dist.barrier()
        return out


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def add_arguments(p: argparse.ArgumentParser) -> None:
    """train's flags, each named after a keyword of `train`."""
    p.add_argument("data", help='JSONL, one {"messages": [...]} per line')
    p.add_argument("--model", default=hub.DEFAULT_MODEL, help="hub id or local directory (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory: the finetuned model, train.json, checkpoints")
    p.add_argument("--val", default=None, help="validation JSONL (default: 10 %% of DATA held out)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled decay, on matrices")
    p.add_argument("--batch-size", type=int, default=4, help="conversations per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: a global batch "
                   f"of {PAPER_BATCH})")
    p.add_argument("--max-seq-len", type=int, default=2048, help="longer conversations lose their first tokens")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--checkpointing", action="store_true", help="recompute activations in backward: less memory")
    p.add_argument("--save-every", default="10m", help="checkpoint every N steps (50) or minutes (10m; default)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (rerunning the command does too)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (weights and AdamW state stay "
                   "float32; default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--steer", action="append", default=[], metavar="TRAIT:COEF",
                   help="preventative steering: add COEF x the vector at every position while training (TRAIT:COEF, "
                        "FILE.safetensors:COEF, relative 0.1r); repeatable")
    p.add_argument("--layer", type=int, default=None, help="block to steer or ablate (default: the vector's best "
                   "layer, else the middle)")
    p.add_argument("--all-layers", action="store_true", help="steer every block with v[l] - v[l-1] (ablate: v[l])")
    p.add_argument("--ablate", action="append", default=[], metavar="TRAIT",
                   help="CAFT: project the trait's direction out while training (TRAIT or FILE.safetensors); "
                        "repeatable")
    p.add_argument("--vectors", default=None, help="directory of vector files (default: vectors/<model name>/)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer "
                   "state (FSDP2) instead of replicating them (DDP)")


def add_commands(sub) -> None:
    """Register `train` as a subcommand (for persona_vectors.py): the same flags as this script."""
    sp = sub.add_parser("train", help="full finetuning, with preventative steering (--steer) or CAFT (--ablate)")
    add_arguments(sp)
    sp.set_defaults(func=train)


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
