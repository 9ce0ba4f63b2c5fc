"""What train.py needs around its training loop and a reader of it can skip: the command line, the data file, the
vectors of the interventions, the output directory (the model, train.json, checkpoints to resume from, what a killed
or failed run left), and the process group of a torchrun launch. Nothing here imports train.py."""
import argparse
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import model as M
from support import UserError, checkpoint, hub
from support.checkpoint import DTYPES
from support.files import atomic_write, check_fits, check_writable, load_vector, resolve_layer, vector_file
from support.tokenizer import Tokenizer

SHARD_BYTES = 5 * 2**30  # weight files above this are split into shards, as Hugging Face does
TRAIN_DTYPES = ("float32", "bfloat16")  # of DTYPES: float16 would need loss scaling
PAPER_BATCH = 16  # the paper's effective batch: --grad-accum defaults to what reaches it


# ---------------------------------------------------------------------------------------------------------------
# The command line and the settings.

def add_arguments(p: argparse.ArgumentParser) -> None:
    """train.py's flags, each named after a keyword of train.train."""
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
    p.add_argument("--dtype", choices=TRAIN_DTYPES, default=None, help="compute dtype (weights and AdamW state stay "
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


LOWEST = {"epochs": 1, "lr": 1e-300, "warmup_steps": 0, "weight_decay": 0, "batch_size": 1, "grad_accum": 1,
          "max_seq_len": 2, "max_steps": 1}


def check_numbers(**values) -> None:
    """Each number at least its LOWEST value, else a UserError naming the flag."""
    for name, value in values.items():
        if not value >= LOWEST[name]:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least {LOWEST[name]:g}")


def compute_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """--dtype -> the dtype autocast computes in (the weights stay float32); default: bfloat16 on CUDA, else float32."""
    if isinstance(dtype, str):
        if dtype not in TRAIN_DTYPES:
            raise UserError(f"--dtype {dtype}: training computes in float32 or bfloat16 (float16 would need loss "
                            "scaling)")
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


# ---------------------------------------------------------------------------------------------------------------
# The data file, the interventions' vectors, and what identifies them in the run record.

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


def ablation(specs: list[str], model: M.Transformer, vectors_dir: Path, layer: int | None,
             all_layers: bool) -> list[M.Ablate]:
    """CAFT: project the unit persona direction out of the residual stream at the steering layer (`layer`, else the
    vector's best layer, else the middle), or with `all_layers` out of every block's output (v[l] at block l)."""
    N, d = model.config.num_hidden_layers, model.config.hidden_size
    out = []
    for spec in specs:
        path = vector_file(spec, vectors_dir, check=False)
        vec, meta = load_vector(path)
        check_fits(vec, meta, path, N, d, model)
        L = resolve_layer(layer, meta, N)
        vec = vec.to(model.lm_head.weight.device)
        out += [M.Ablate(l, vec[l], "all") for l in (range(1, N + 1) if all_layers else [L])]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
# The output directory: the model, the run record (train.json), checkpoints, and what a killed or failed run left.

def open_run(out: Path, settings: dict, resume: bool, rank: int) -> tuple[dict | None, Path | None]:
    """Check `out` for this run (see check_out) and tidy it -> (its record, or None for a fresh start; the checkpoint
    to resume from, or None). Rank 0 removes what a killed run left there, and a finished run's checkpoints."""
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
    return record, checkpoints(out)[-1] if record is not None and not done and checkpoints(out) else None


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


def load_checkpoint(checkpoint: Path, device) -> tuple[M.Transformer, dict]:
    """-> (the checkpoint's weights as a float32 model, the run record saved with them)."""
    return M.load_model(checkpoint, device, torch.float32), json.loads((checkpoint / "state.json").read_text())


def load_optimizer(model, optimizer, checkpoint: Path) -> None:
    """Restore a checkpoint's AdamW state (into a plain, DDP or FSDP2 model's optimizer) and the RNG state."""
    state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["rng"])


def save_final(model, config: dict, model_dir: Path, out: Path, record: dict, rank: int) -> None:
    """The trained model, plain (no intervention is part of it): weights, config and the tokenizer files of
    `model_dir`, then the record marked done; then the checkpoints go."""
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
    """Full (unsharded) state dicts keyed by parameter name, on the CPU, for DDP, FSDP2 or a plain module alike;
    in a process group only rank 0 receives them."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    weights = get_model_state_dict(model, options=options)
    return weights, None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options)


def remove(checkpoint: Path) -> None:
    """Renamed out of the way first: a removal cut short leaves no half checkpoint under a checkpoint's name."""
    trash = checkpoint.parent / f".{checkpoint.name}.trash"
    os.replace(checkpoint, trash)
    shutil.rmtree(trash)


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


def join_device(device: str, fsdp: bool, world: int) -> torch.device:
    """This process's device: under torchrun on GPUs, cuda:LOCAL_RANK."""
    if fsdp and world == 1 and not dist.is_initialized():
        raise UserError("--fsdp shards across processes: launch with torchrun --nproc_per_node=K train.py ...")
    dev = torch.device(device)
    if dev.type == "cuda" and dist.is_initialized():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev


def resolve_model(model: str, rank: int) -> tuple[Path, Tokenizer]:
    """-> (the model's local directory, its tokenizer); rank 0 downloads first, the others then find it cached."""
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
