"""What train.py needs around its training loop and a reader of it can skip: the checks of its
settings, the data file, the vectors of CAFT, the run's bookkeeping (train.json, the progress
line, checkpoints, resuming, the stop on a non-finite or diverging loss), the output directory's
safety (its lock, atomic checkpoints, what a killed or failed run left), and the processes of a
torchrun launch (DDP, FSDP2). Nothing here imports train.py."""

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
from support import UserError, checkpoint, hub, limits
from support.checkpoint import DTYPES
from support.files import (
    LOCK,
    atomic_write,
    check_directions,
    check_fits,
    check_writable,
    load_vector,
    locked,
    made_dirs,
    resolve_layer,
    vector_file,
)
from support.tokenizer import Tokenizer

SHARD_BYTES = 5 * 2**30  # weight files above this are split into shards, as Hugging Face does
TRAIN_DTYPES = ("float32", "bfloat16")  # of DTYPES: float16 would need loss scaling
PAPER_BATCH = 16  # the paper's effective batch: --grad-accum defaults to what reaches it
DIVERGED = 5.0  # nats: a loss this far above its start (step 1's, or validation before training)
# stops the run; a working finetune lowers it, a too high --lr sends it towards log(vocab) or beyond


# --------------------------------------------------------------------------------------------------
# The settings: checked once, before anything is read or written.


# train's numbers -> their rows in support/limits.LIMITS, the ranges train.py's flags take too
LIMIT_OF = {"epochs": "count", "max_steps": "count", "lr": "learning_rate", "warmup_steps": "steps"}
LIMIT_OF |= {"weight_decay": "weight_decay", "batch_size": "count", "grad_accum": "count"}
LIMIT_OF |= {"max_seq_len": "max_seq_len"}
INTERRUPTED = "\ninterrupted: run the same command again to resume from the last checkpoint"
OUT_OF_MEMORY = (
    "error: out of memory: lower --batch-size (raise --grad-accum to keep the batch) or "
    "--max-seq-len, or add --checkpointing, or shard with --fsdp"
)


def run(call) -> int:
    """train.py's command -> its exit status: a UserError is one line on stderr (rank 0 only), out
    of memory a line on what to lower (1); Ctrl-C says how to resume (130)."""
    try:
        call()
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(OUT_OF_MEMORY, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 0


def exit_process(status: int):
    """End train.py's process with `status`. Under torchrun, Python's teardown is skipped (stdout
    and stderr flushed, then os._exit): PyTorch's gloo backend keeps its worker threads past
    destroy_process_group, and one that frees a tensor while the interpreter finalizes aborts the
    process (SIGABRT, "terminate called without an active exception") after a finished run."""
    if "RANK" not in os.environ:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def check_settings(settings: dict) -> None:
    """train's keywords: each number in the range its flag takes (grad_accum and max_steps may be
    unset), --save-every and --dtype readable; else a UserError naming the flag."""
    for name, row in LIMIT_OF.items():
        value = settings[name]
        if value is None and name in ("grad_accum", "max_steps"):
            continue  # unset: the default
        problem = limits.out_of_range(value, row)
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {value} {problem}")
    parse_save_every(settings["save_every"])
    if isinstance(settings["dtype"], str):
        compute_dtype(settings["dtype"], "cpu")


def compute_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """--dtype -> the dtype autocast computes in (the weights stay float32); default: bfloat16 on
    CUDA, else float32."""
    if isinstance(dtype, str):
        if dtype not in TRAIN_DTYPES:
            raise UserError(
                f"--dtype {dtype}: training computes in float32 or bfloat16 (float16 would need "
                "loss scaling)"
            )
        dtype = DTYPES[dtype]
    return dtype or checkpoint.default_dtype(device)


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


# --------------------------------------------------------------------------------------------------
# One process or many (torchrun): this process, its device, DDP or FSDP2.


@dataclass
class Process:
    """This process of a run: its rank and the world size (0 and 1 without torchrun), its device,
    and the dtype autocast computes in (the weights stay float32)."""

    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype

    def say(self, *args, **kw) -> None:
        """print to stderr, on rank 0 only."""
        if self.rank == 0:
            print(*args, file=sys.stderr, flush=True, **kw)

    def autocast(self):
        """bf16 compute on the fp32 weights; no cache of cast weights (that is a bf16 copy of the
        model)."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, self.dtype, enabled=enabled, cache_enabled=False)


@contextlib.contextmanager
def launch(out: Path, device: str | None, dtype, fsdp: bool):
    """-> this Process. Joins the process group when launched by torchrun (and leaves it at the
    end); holds `out` for the run (rank 0; see files.locked: a second run on it stops); on a
    failure, `out` and the folders made for it go if they are left empty."""
    device = device or checkpoint.default_device()
    dtype = compute_dtype(dtype, device)
    with process_group(device) as (rank, world), made_dirs(out):
        with locked(out, "--out") if rank == 0 else contextlib.nullcontext():  # one run at a time
            yield Process(rank, world, join_device(device, fsdp, world), dtype)


@contextlib.contextmanager
def process_group(device: str):
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on the CPU) -> (rank,
    world size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def join_device(device: str, fsdp: bool, world: int) -> torch.device:
    """This process's device: under torchrun on GPUs, cuda:LOCAL_RANK."""
    if fsdp and world == 1 and not dist.is_initialized():
        raise UserError(
            "--fsdp shards across processes: launch with torchrun --nproc_per_node=K train.py ..."
        )
    dev = torch.device(device)
    if dev.type == "cuda" and dist.is_initialized():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def resolve_model(model: str, rank: int) -> tuple[Path, Tokenizer]:
    """-> (the model's local directory, its tokenizer); rank 0 downloads first, the others then find
    it cached."""
    try:
        if rank > 0:
            dist.barrier()
        model_dir = hub.resolve(model, verbose=rank == 0)
        if rank == 0 and dist.is_initialized():
            dist.barrier()
        return model_dir, Tokenizer(model_dir)
    except (ValueError, FileNotFoundError, hub.HubError) as e:
        raise UserError(str(e)) from None


def parallelize(model: M.Transformer, device: torch.device, fsdp: bool):
    """PyTorch's own data parallelism: DDP (a full replica per process, gradients all-reduced) or
    FSDP2 (parameters, gradients and optimizer state sharded across the processes, each block
    gathered when it runs)."""
    if not dist.is_initialized():
        return model
    if fsdp:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    # gradient_as_bucket_view: the gradients are views of the all-reduce buffers, not a second copy
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------------
# The data: the conversation file, the validation split, each step's conversations and
# this process's micro-batches of them (examples: train.Example, with .ids and .trained).


def read_conversations(path: Path) -> list[tuple[int, list]]:
    """(line number, messages) for each non-blank line of a JSONL file; any malformed line is an
    error naming it."""
    if not path.is_file():
        raise UserError(f"no data file {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): is it a JSONL file?"
        ) from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{n}: not JSON ({e.msg}, column {e.colno}): each line must be one "
                '{"messages": [...]} object'
            ) from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UserError(
                f'{path}:{n}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}, '
                f"got {line[:60]!r}"
            )
        out.append((n, messages))
    if not out:
        raise UserError(
            f'{path} holds no conversations: write one {{"messages": [...]}} object per line'
        )
    return out


def nothing_to_train(path: Path, counts: dict, max_seq_len: int) -> str:
    return (
        f"{path}: no conversation to train on ({counts['no_assistant_reply']} without an assistant "
        f"reply, {counts['reply_longer_than_max_seq_len']} whose last reply alone exceeds "
        f"--max-seq-len {max_seq_len})"
    )


def within_context(model_dir: Path, max_seq_len: int, say) -> int:
    """--max-seq-len, at most the model's context (max_position_embeddings), said when it is cut."""
    context = checkpoint.read_config(model_dir / "config.json").max_position_embeddings
    if max_seq_len <= context:
        return max_seq_len
    say(
        f"--max-seq-len {max_seq_len} is past the model's context ({context} tokens, "
        f"max_position_embeddings): training on at most {context}"
    )
    return context


def hold_out(examples: list) -> tuple[list, list]:
    """-> (train, validation): a fixed 10 % of the conversations, the same whatever --seed."""
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = len(examples) // 10
    return [examples[i] for i in sorted(perm[n_val:])], [examples[i] for i in sorted(perm[:n_val])]


def pad_left(examples: list, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """-> ids [B, T], attention mask [B, T] (None when no row is padded), trained [B, T]."""
    ids, mask = M.left_pad([e.ids for e in examples], pad_id)
    trained = M.left_pad([e.trained for e in examples])[0].bool()
    return ids.to(device), None if mask.all() else mask.to(device), trained.to(device)


def step_examples(examples: list, step: int, global_batch: int, seed: int) -> list:
    """The conversations of optimizer step `step` (0-based). Epoch e visits them in the e-th
    permutation drawn from a generator seeded with `seed`: the order is a function of (seed,
    step), so a resumed run sees the same."""
    per_epoch = math.ceil(len(examples) / global_batch)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epoch + 1):
        order = torch.randperm(len(examples), generator=g).tolist()
    return [examples[j] for j in order[i * global_batch : (i + 1) * global_batch]]


def my_micro_batches(examples: list, rank: int, world: int, grad_accum: int) -> list:
    """Split a step's conversations, sorted by length (less padding), into world x grad_accum
    micro-batches and return this process's grad_accum of them, each with its loss weight: world
    / trained tokens of the whole step, so that the summed and (by DDP or FSDP) averaged gradient
    is that of the mean loss per trained token. A micro-batch that a short last step leaves empty
    repeats a conversation at weight 0: every process must run the same number of forward passes."""
    tokens = sum(int(e.trained[1:].sum()) for e in examples)
    slots = world * grad_accum
    examples = sorted(examples, key=lambda e: len(e.ids))
    size = math.ceil(len(examples) / slots)
    parts = [examples[j * size : (j + 1) * size] for j in range(slots)]
    mine = [parts[j] for j in range(rank, slots, world)]  # rank r's m-th: part m * world + r
    return [(part, world / tokens) if part else (examples[:1], 0.0) for part in mine]


@dataclass
class Batches:
    """The conversations of each optimizer step, and this process's micro-batches of them:
    `global_batch` a step, in an order that is a function of (seed, step) (step_examples), split
    across the processes and into grad_accum micro-batches (my_micro_batches), padded on the left
    (pad_left)."""

    train: list
    val: list
    batch_size: int
    grad_accum: int
    seed: int
    pad_id: int
    proc: Process

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.proc.world

    def of_step(self, step: int) -> tuple[list, list[tuple]]:
        """-> (step `step`'s conversations, this process's micro-batches: (ids, mask, trained,
        weight))."""
        examples = step_examples(self.train, step, self.global_batch, self.seed)
        mine = my_micro_batches(examples, self.proc.rank, self.proc.world, self.grad_accum)
        return examples, [(*pad_left(part, self.pad_id, self.proc.device), w) for part, w in mine]


def trained_tokens(examples) -> int:
    return sum(int(e.trained[1:].sum()) for e in examples)


# --------------------------------------------------------------------------------------------------
# The model to train, CAFT's directions, and what identifies the interventions.


def load_model(model_dir: Path, device: torch.device, name: str) -> M.Transformer:
    """The model to train, float32 (the master weights; autocast computes in bfloat16), named
    `name`."""
    try:
        lm = checkpoint.load_model(model_dir, device, torch.float32)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    lm.name_or_path = name
    return lm


def ablation(
    specs: list[str], model: M.Transformer, vectors_dir: Path, layer: int | None, all_layers: bool
) -> list[M.Ablate]:
    """CAFT: project the unit persona direction out of the residual stream at the steering layer
    (`layer`, else the vector's best layer, else the middle), or with `all_layers` out of every
    block's output (v[l] at block l)."""
    N, d = model.config.num_hidden_layers, model.config.hidden_size
    out = []
    for spec in specs:
        path = vector_file(spec, vectors_dir, check=False)
        vec, meta = load_vector(path)
        check_fits(vec, meta, path, N, d, model)
        layers = range(1, N + 1) if all_layers else [resolve_layer(layer, meta, N)]
        check_directions(vec, layers, path)
        vec = vec.to(model.lm_head.weight.device)
        out += [M.Ablate(l, vec[l], "all") for l in layers]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(interventions: list) -> str:
    """sha256 of the interventions as applied (layers, coefficients, vector values): a re-extracted
    vector counts as a changed setting when resuming."""
    h = hashlib.sha256()
    for x in interventions:
        v = x.vector if isinstance(x, M.Steer) else x.direction
        h.update(f"{type(x).__name__} {x.layer} {getattr(x, 'coef', 1.0)!r};".encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The run's bookkeeping around the loop: the record (train.json), progress, checkpoints.


class Run:
    """A run's record (train.json) and checkpoints, kept by the training loop: the settings that
    identify the run, the data counts, each step's loss, learning rate and gradient norm, the
    validation losses, the progress line, a checkpoint every --save-every, the stop on a
    non-finite or diverging loss (see DIVERGED), and the final save. Made before the model is
    loaded (it says what it will do), then opened."""

    def __init__(self, settings: dict, batches: Batches, counts: dict, model_dir: Path):
        """settings: train's keywords, max_seq_len as trained on; counts: load_data's."""
        self.proc, self.batches, self.counts = batches.proc, batches, counts
        self.model_dir = model_dir
        self.settings = settings | {"grad_accum": batches.grad_accum}
        self.settings |= {"global_batch": batches.global_batch, "dtype": self.proc.dtype}
        self.out = Path(settings["out"])
        self.per_epoch = math.ceil(len(batches.train) / batches.global_batch)
        self.steps = settings["max_steps"] or settings["epochs"] * self.per_epoch
        self.save_steps, self.save_seconds = parse_save_every(settings["save_every"])
        self.finished, self.checkpoint, self.record, self.config = False, None, {}, {}
        self.done_here = self.tokens_here = 0
        self.t_start = self.t_saved = time.time()
        self.want_save = False
        self.describe()

    def describe(self) -> None:
        s, n, train_set, val_set = self.settings, self.counts, self.batches.train, self.batches.val
        held = " (10 % held out)" if val_set else " (fewer than 10 conversations: give --val FILE)"
        held = "" if s["val"] else held
        self.proc.say(
            f"data: {len(train_set)} conversations to train on ({trained_tokens(train_set)} "
            f"trained tokens), {len(val_set)} to validate on{held}; {n['no_assistant_reply']} "
            f"skipped (no assistant reply), {n['truncated_left']} truncated from the left to "
            f"--max-seq-len {s['max_seq_len']}, {n['reply_longer_than_max_seq_len']} left out "
            "(last reply alone longer)"
        )
        world, es = self.proc.world, "es" if self.proc.world > 1 else ""
        self.proc.say(
            f"{self.steps} steps of {s['global_batch']} conversations ({world} process{es} x batch "
            f"{s['batch_size']} x {s['grad_accum']} accumulated), {self.per_epoch} steps per epoch"
        )

    def open(self, lm: M.Transformer, interventions: list) -> None:
        """Check `out` for this run (see check_out) and tidy it: the run is then fresh, or resumes
        from its last checkpoint (`checkpoint`), or is already `finished`."""
        settings = run_settings(self.settings, interventions)
        resume, rank = self.settings["resume"], self.proc.rank
        found, self.checkpoint = open_run(self.out, settings, resume, rank)
        self.finished = found is not None and found["status"] == "done"
        if self.finished:
            self.proc.say(f"{self.out} already holds this finished run")
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.config["tie_word_embeddings"] = lm.config.tie_word_embeddings
        train_set, val_set = self.batches.train, self.batches.val
        data = {"train": str(Path(self.settings["data"])), "val": self.settings["val"]}
        data |= {"train_conversations": len(train_set), "val_conversations": len(val_set)}
        data |= {"trained_tokens": trained_tokens(train_set), **self.counts}
        self.record = {"settings": settings, "status": "running", "step": 0, "steps": self.steps}
        self.record |= {"data": data, "log": [], "val_loss": []}
        self.record |= {"world_size": self.proc.world, "parallel": self.parallel()}

    def parallel(self) -> str | None:
        return ("fsdp" if self.settings["fsdp"] else "ddp") if dist.is_initialized() else None

    @property
    def step(self) -> int:
        """Steps done."""
        return self.record["step"]

    def resumed(self, lm: M.Transformer) -> M.Transformer:
        """The model to train: `lm`, or when resuming the checkpoint's (float32) weights, with its
        record."""
        if self.checkpoint is None:
            return lm
        lm.to("meta")  # the base weights go (the caller still holds lm), then the checkpoint's come
        lm, record = load_checkpoint(self.checkpoint, self.proc.device)
        self.proc.say(f"resuming from {self.checkpoint} (step {record['step']} of {self.steps})")
        self.record = record | {"world_size": self.proc.world, "parallel": self.parallel()}
        return lm

    def load_optimizer(self, model, optimizer) -> None:
        """AdamW's state and the RNG, as the checkpoint saved them."""
        load_optimizer(model, optimizer, self.checkpoint)
        self.t_start = self.t_saved = time.time()

    def start(self, val_loss: float | None) -> None:
        """A fresh run: the validation loss before training, and train.json written."""
        if val_loss is not None:
            self.record["val_loss"].append({"step": 0, "epoch": 0, "loss": val_loss})
            self.proc.say(f"validation loss before training: {val_loss:.4f}")
        if self.proc.rank == 0:
            write_json(self.out / "train.json", self.record)
        self.t_start = self.t_saved = time.time()

    def log(self, step: int, examples: list, loss, norm, lr: float) -> None:
        """Record step `step` (0-based): its mean loss per trained token over all processes, its
        learning rate and gradient norm; print the progress line. A non-finite loss, or one DIVERGED
        above step 1's, stops the run (a UserError)."""
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        norm = float(norm)
        due = self.save_steps is not None and (step + 1) % self.save_steps == 0
        seconds = time.time() - self.t_saved
        due = due or self.save_seconds is not None and seconds > self.save_seconds
        loss_sum, want_save = all_sum([float(loss), float(due)], self.proc.device)  # agreed by all
        self.want_save = bool(want_save)
        loss = loss_sum / trained_tokens(examples)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.stop(f"non-finite loss at step {step + 1}", "or check the data, ")
        first = self.record["log"][0]["loss"] if self.record["log"] else loss
        if loss > first + DIVERGED:
            self.stop(f"the loss diverged at step {step + 1} ({loss:.4g}, {first:.4g} at step 1)")
        self.done_here += 1
        self.tokens_here += sum(len(e.ids) for e in examples)
        elapsed = time.time() - self.t_start
        eta = duration(elapsed / self.done_here * (self.steps - step - 1))
        self.proc.say(
            f"\rstep {step + 1}/{self.steps}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{self.tokens_here / elapsed:,.0f} tok/s  ETA {eta}\033[K",
            end="",
        )
        self.record["log"].append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm})
        self.record["step"] = step + 1

    def epoch_ends(self, step: int) -> bool:
        return (step + 1) % self.per_epoch == 0 or step + 1 == self.steps

    def validated(self, step: int, val_loss: float) -> None:
        """Record the validation loss at the end of step `step` (0-based), an epoch's end; one not
        finite or DIVERGED above the loss before training stops the run (a UserError)."""
        epoch = (step + 1) / self.per_epoch
        record = {"step": step + 1, "epoch": round(epoch, 3), "loss": val_loss}
        self.proc.say(f"\nepoch {epoch:g}: validation loss {val_loss:.4f}")
        start = self.record["val_loss"][0]["loss"] if self.record["val_loss"] else val_loss
        if not math.isfinite(val_loss) or val_loss > start + DIVERGED:
            what = f"{val_loss:.4g}, {start:.4g} before training"
            self.stop(f"the validation loss diverged at step {step + 1} ({what})")
        self.record["val_loss"].append(record)

    def stop(self, why: str, also: str = "") -> None:
        """Stop the run (a UserError) on a loss that is not finite or diverged: the last checkpoint,
        saved after a step whose loss passed, is kept; nothing else is saved."""
        self.proc.say("")  # end the progress line
        last = checkpoints(self.out)
        raise UserError(
            f"{why}: stopped; the last good checkpoint ({last[-1] if last else 'none'}) is kept. "
            f"Lower --lr or the --steer coefficient, {also}then start again in a new --out"
        )

    def checkpoint_if_due(self, step: int, model, optimizer) -> None:
        """A checkpoint after step `step` (0-based) when --save-every says so and it is not the
        last."""
        if self.want_save and step + 1 < self.steps:
            save_checkpoint(self.out, model, optimizer, self.config, self.record, self.proc.rank)
            self.t_saved = time.time()

    def finish(self, model) -> Path:
        """Save the trained model (see save_final) -> the output directory."""
        self.proc.say("")
        save_final(model, self.config, self.model_dir, self.out, self.record, self.proc.rank)
        self.proc.say(f"saved {self.out} (train.json: settings and losses)")
        return self.out


def run_settings(settings: dict, interventions: list) -> dict:
    """What identifies a run in train.json (a rerun must match it to resume): train's keywords that
    change the result, the data files' sha256, and the interventions' values (see fingerprint)."""
    s, val = settings, settings["val"]
    return {
        "model": s["model"],
        "data_sha256": sha256_file(Path(s["data"])),
        "val_sha256": sha256_file(Path(val)) if val else None,
        **{k: s[k] for k in ("epochs", "max_steps", "lr", "warmup_steps", "weight_decay")},
        **{k: s[k] for k in ("global_batch", "max_seq_len", "seed")},
        "dtype": str(s["dtype"]).removeprefix("torch."),
        "steer": list(s["steer"]),
        "ablate": list(s["ablate"]),
        **{k: s[k] for k in ("layer", "all_layers")},
        "interventions_sha256": fingerprint(interventions),
    }


# --------------------------------------------------------------------------------------------------
# The output directory: the model, train.json, checkpoints, and what a killed or failed run left.


def open_run(out: Path, settings: dict, resume: bool, rank: int) -> tuple[dict | None, Path | None]:
    """Check `out` for this run (see check_out) and tidy it -> (its record, or None for a fresh
    start; the checkpoint to resume from, or None). Rank 0 removes what a killed run left there,
    and a finished run's checkpoints."""
    if rank == 0:
        check_writable(out)
    record = check_out(out, settings, resume)
    if dist.is_initialized():
        dist.barrier()  # every process has read `out` before rank 0 writes to it
    done = record is not None and record["status"] == "done"
    if rank == 0:
        remove_leftovers(out)  # of a run killed while it wrote or removed a file
        for old in (
            checkpoints(out) if done else []
        ):  # killed after its last save, before this removal
            remove(old)
    return record, checkpoints(out)[-1] if record is not None and not done and checkpoints(
        out
    ) else None


def check_out(out: Path, settings: dict, resume: bool) -> dict | None:
    """-> the record of this same run when `out` holds it (to resume, or already done); None for a
    fresh start. Anything else in `out` is refused: another run's settings, or files that are not
    a run."""
    path = out / "train.json"
    if not path.is_file():
        if resume:
            raise UserError(
                f"--resume: {out} holds no training run; run without --resume to start one"
            )
        if out.is_dir() and not all(leftover(p) or p.name == LOCK for p in out.iterdir()):
            raise UserError(
                f"--out {out} is not empty and holds no training run: choose a new or empty "
                "directory"
            )
        return None
    record = json.loads(path.read_text())
    old = record["settings"]
    changed = [k for k in {**old, **settings} if old.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        what = f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" + (
            f", and {len(changed) - 1} more" if len(changed) > 1 else ""
        )
        if resume:
            raise UserError(
                f"--resume with changed settings ({what}): rerun with the original settings, or "
                "choose another --out to start a new run"
            )
        raise UserError(
            f"--out {out} holds a different run ({what}): choose another --out, or rerun with that "
            "run's settings to resume it"
        )
    return record


def save_model(weights: dict, config: dict, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json and the weights (fp32) as model.safetensors, or as shards with an index
    past shard_bytes: the Hugging Face layout that model.load and transformers both read."""
    config = dict(config) | {k: "float32" for k in ("torch_dtype", "dtype") if k in config}
    if config.get("tie_word_embeddings"):
        weights = {
            k: v for k, v in weights.items() if k != "lm_head.weight"
        }  # one tensor, stored once
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    shards, size = [[]], 0
    for k, v in weights.items():
        if shards[-1] and size + v.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += v.nbytes
    out.mkdir(parents=True, exist_ok=True)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, keys in zip(names, shards):
        atomic_write(
            out / name,
            lambda p, keys=keys: save_file(
                {k: weights[k] for k in keys}, p, metadata={"format": "pt"}
            ),
        )
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
        }
        write_json(out / "model.safetensors.index.json", index)
    write_json(out / "config.json", config)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Every file of the source model directory but its weights, config and run record (tokenizer,
    template, generation config, license)."""
    for f in sorted(src.iterdir()):
        weights = f.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json"))
        if (
            f.is_file()
            and not weights
            and f.name not in ("config.json", "train.json")
            and not f.name.startswith(".")
        ):
            shutil.copyfile(f, dst / f.name)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (a checkpoint appears by renaming a finished
    directory)."""
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir())


def save_checkpoint(out: Path, model, optimizer, config: dict, record: dict, rank: int) -> Path:
    """checkpoint-STEP/: the weights (a loadable model), the optimizer state and RNG, and the run
    record. It is written under a temporary name and renamed when complete, then the older
    checkpoints are removed."""
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


def load_checkpoint(path: Path, device) -> tuple[M.Transformer, dict]:
    """-> (the checkpoint's weights as a float32 model, the run record saved with them)."""
    return checkpoint.load_model(path, device, torch.float32), json.loads(
        (path / "state.json").read_text()
    )


def load_optimizer(model, optimizer, checkpoint: Path) -> None:
    """Restore a checkpoint's AdamW state (into a plain, DDP or FSDP2 model's optimizer) and the RNG
    state."""
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    torch.set_rng_state(state["rng"])


def save_final(model, config: dict, model_dir: Path, out: Path, record: dict, rank: int) -> None:
    """The trained model, plain (no intervention is part of it): weights, config and the tokenizer
    files of `model_dir`, then the record marked done; then the checkpoints go."""
    weights, _ = full_state(model)
    if rank == 0:
        save_model(weights, config, out)
        copy_tokenizer_files(model_dir, out)
        record["status"] = "done"
        write_json(out / "train.json", record)
        for old in checkpoints(out):
            remove(old)
    if dist.is_initialized():
        dist.barrier()


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded) state dicts keyed by parameter name, on the CPU, for DDP, FSDP2 or a plain
    module alike; in a process group only rank 0 receives them."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    weights = get_model_state_dict(model, options=options)
    return weights, None if optimizer is None else get_optimizer_state_dict(
        model, optimizer, options=options
    )


def remove(checkpoint: Path) -> None:
    """Renamed out of the way first: a removal cut short leaves no half checkpoint under a
    checkpoint's name."""
    trash = checkpoint.parent / f".{checkpoint.name}.trash"
    os.replace(checkpoint, trash)
    shutil.rmtree(trash)


# safetensors' own temporary, left by runs before atomic_write gave it a folder of ours to write in
LIBRARY_TEMP = re.compile(r"\.tmp\w{6}")


def leftover(path: Path) -> bool:
    """Whether a file or folder in an output directory is what a killed run left: the temporary of
    an atomic write (.NAME.PID-XXXX.tmp), or a checkpoint being written (.checkpoint-N.tmp) or
    removed (.checkpoint-N.trash), or a library's temporary of an older version's save."""
    name = path.name
    ours = name.startswith(".") and name.endswith((".tmp", ".trash"))
    return ours or bool(LIBRARY_TEMP.fullmatch(name))


def remove_leftovers(out: Path) -> None:
    for p in out.iterdir() if out.is_dir() else []:  # made at the first write
        if leftover(p):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
