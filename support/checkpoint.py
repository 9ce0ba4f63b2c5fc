"""Reading a Hugging Face-layout checkpoint safely: config.json checked key by key, safetensors weights checked
tensor by tensor, and the device checked before anything is loaded (model.py's loader builds and assigns)."""
import json
import sys
import types
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from support import UserError
from support.files import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype's names
ROPE_NEEDS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def read_config(path: Path, config_class):
    """A config.json -> config_class(...) (model.Config), every key it reads checked by `check_config`."""
    return config_class(**check_config(read_json(path), config_class, str(path)))


def check_config(d: dict, config_class, source: str = "config.json") -> dict:
    """config.json's keys -> the keys of `config_class` (a dataclass), each present one checked for its JSON type
    and value, with transformers 5's `rope_parameters` unfolded; a UserError naming `source` and the key."""
    def fail(msg: str):
        raise UserError(f"{source}: {msg}")

    if not isinstance(d, dict):
        fail(f"expected a JSON object, got {type(d).__name__}")
    d = dict(d)
    if "rope_parameters" in d:  # transformers >= 5 writes rope settings as one dict
        rp = d.pop("rope_parameters") or {}
        if not isinstance(rp, dict):
            fail(f"`rope_parameters` must be an object, not {rp!r}")
        d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default":
            d.setdefault("rope_scaling", rp)
    known = fields(config_class)
    missing = [f.name for f in known if f.default is MISSING and f.name not in d]
    if missing:
        fail(f"lacks required key(s) {', '.join(missing)}: is this a causal-LM config?")
    for f in known:
        if f.name in d and not _json_type_ok(d[f.name], f.type):
            fail(f"`{f.name}` must be {_json_type_name(f.type)}, not {json.dumps(d[f.name])[:80]}")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if d.get(k) is not None and d[k] < 1:
            fail(f"`{k}` must be at least 1, not {d[k]}")
    if d["model_type"] not in SUPPORTED_MODEL_TYPES:
        fail(f"unsupported model_type {d['model_type']!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    kv = d.get("num_key_value_heads") or d["num_attention_heads"]
    if d["num_attention_heads"] % kv:
        fail(f"`num_attention_heads` ({d['num_attention_heads']}) is not a multiple of `num_key_value_heads` ({kv})")
    if d.get("hidden_act", "silu") != "silu":
        fail(f"unsupported hidden_act {d['hidden_act']!r}; only 'silu' (Llama/Qwen2/Mistral) is implemented")
    rs = d.get("rope_scaling") or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in ROPE_NEEDS:
        fail(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")
    for k in ROPE_NEEDS[rope_type]:
        if not _json_type_ok(rs.get(k), float):
            fail(f"`rope_scaling.{k}` must be a number for rope type {rope_type!r}, not {json.dumps(rs.get(k))[:80]}")
    return {f.name: d[f.name] for f in known if f.name in d}


def _json_type_ok(value, typ) -> bool:
    """Whether a JSON value fits a Config field type: int, float (an int is fine), bool, str, dict, or X | None."""
    options = typ.__args__ if isinstance(typ, types.UnionType) else (typ,)
    for t in options:
        if value is None and t is type(None) or isinstance(value, bool) and t is bool:
            return True
        if isinstance(value, bool):
            continue  # true/false is not a number
        if isinstance(value, int) and t in (int, float) or isinstance(value, float) and t is float \
                or isinstance(value, (str, dict)) and t is type(value):
            return True
    return False


def _json_type_name(typ) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
             type(None): "null"}
    return " or ".join(names[t] for t in (typ.__args__ if isinstance(typ, types.UnionType) else (typ,)))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict) \
                or not all(isinstance(v, str) for v in weight_map["weight_map"].values()):
            raise UserError(f"{index}: expected an object with a `weight_map` of tensor name -> file name")
        return [model_dir / name for name in sorted(set(weight_map["weight_map"].values()))]
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                    "(only safetensors weights are supported; convert .bin checkpoints first)")


def read_weights(model_dir: Path, expected: dict, tied: bool, device, dtype, model_type: str) -> dict:
    """Every tensor of the checkpoint, checked against `expected` (name -> shape) -> {name: tensor on device}.

    Extras that are harmless are skipped (rotary inv_freq, recomputed; lm_head.weight of a tied model); a missing
    lm_head.weight means a tied head. Any other unexpected, missing or misshapen tensor is a UserError."""
    files = weight_files(Path(model_dir))
    state = {}
    for n, path in enumerate(files, start=1):
        if len(files) > 1:
            print(f"loading {path.name} ({n}/{len(files)})", file=sys.stderr, flush=True)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and tied):
                        continue
                    if key not in expected:
                        raise UserError(f"unexpected tensor {key!r} in {path}: not a {model_type} checkpoint?")
                    t = f.get_tensor(key)
                    if t.shape != expected[key]:
                        raise UserError(f"tensor {key!r} in {path} has shape {tuple(t.shape)}, "
                                        f"expected {tuple(expected[key])}: config.json does not match the weights")
                    state[key] = t.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path} ({e}); the file is missing or truncated: download it again") from None
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, or no separate head: share it
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}: "
                        "incomplete download?")
    return state


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # bf16 is ~6x slower on CPU


def check_device(device: str) -> str:
    """The device name, if this machine has it; else a UserError (torch would fail later, with an AssertionError)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: no CUDA GPU is available to this PyTorch "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: Apple MPS is not available here; use --device cpu")
    return str(device)


def model_shape(model_name: str) -> tuple[int, int, str]:
    """(num_layers, hidden, model_type) from the model's config.json (no weights are loaded)."""
    from support import hub  # a name may need a download first
    path = hub.resolve(model_name, verbose=False) / "config.json"
    config = read_json(path)
    try:
        return int(config["num_hidden_layers"]), int(config["hidden_size"]), config.get("model_type", "unknown")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{path} gives no num_hidden_layers and hidden_size: is {model_name} a model?") from None
