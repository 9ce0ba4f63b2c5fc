"""Loading a model by name, and the checks before it: config.json checked key by key and the
weights' names and shapes (one-line errors), the device checked before anything is loaded, hub ids
and the offline GGUF fallback resolved (hub.py), the tokenizer built, and the CPU speed-up applied.
model.py's `load_model` then reads the directory strictly; this is the project's door to it.

    model, tok = checkpoint.load("HuggingFaceTB/SmolLM2-135M-Instruct")
"""

import json
import math
import types
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import model as M
from support import UserError
from support.files import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}  # --dtype's names
ROPE_NEEDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Config numbers that must be above 0 where set (0 or less gives NaN logits, or a complex scale).
POSITIVE_NUMBERS = (
    "rope_theta",
    "rope_local_base_freq",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


def load(name_or_path: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """A model (in eval mode) and its tokenizer from a hub id or a Hugging Face-layout directory ->
    (model, tokenizer). The model records where it came from (name_or_path, source_dir, source), for
    the files we write."""
    from support import hub, tokenizer  # hub: downloads and the GGUF fallback

    model_dir = hub.resolve(name_or_path)
    model = load_model(model_dir, device, dtype)
    model.name_or_path, model.source_dir = str(name_or_path), model_dir
    # hub, local or converted GGUF, and any quantization
    model.source = hub.source(name_or_path, model_dir)
    return model, tokenizer.Tokenizer(model_dir)


def load_model(
    model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None
) -> M.Transformer:
    """model.load_model on a local directory, after the checks (one-line errors), with the defaults
    (the GPU if there is one; bf16 there, fp32 on the CPU) and, on the CPU, the matrix-product split
    (support/cpu_speed.py)."""
    from support import cpu_speed

    device = check_device(device or default_device())
    config = read_config(Path(model_dir) / "config.json")  # model.py reads it again, unchecked
    check_weights(Path(model_dir), config)
    model = M.load_model(model_dir, device, dtype or default_dtype(device))
    return cpu_speed.split_linears(model) if torch.device(device).type == "cpu" else model


def read_config(path: Path) -> M.Config:
    """A config.json -> model.Config, every key it reads checked by `check_config`."""
    return M.Config(**check_config(read_json(path), str(path)))


def check_weights(model_dir: Path, config: M.Config) -> None:
    """The checkpoint's tensor names and shapes against the model's, from the files' headers (no
    tensor read), as model.load_model's strict loading will: each problem a one-line UserError
    naming the tensor and the file. The harmless extras are skipped as there (model.our_name)."""
    index = model_dir / "model.safetensors.index.json"
    weight_map = read_json(index) if index.exists() else {"weight_map": {}}
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise UserError(
            f"{index}: expected an object with a `weight_map` of tensor name -> file name"
        )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in M.Transformer(config).state_dict().items()}
    if not index.exists() and not (model_dir / "model.safetensors").exists():
        raise UserError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json "
            "(only safetensors weights are supported; convert .bin checkpoints first)"
        )
    seen, names = set(), sorted(set(weight_map.values())) or ["model.safetensors"]
    for path in [model_dir / name for name in names]:  # the shards, or the one file
        try:
            seen |= check_file(path, expected, config)
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"cannot read {path} ({e}); the file is missing or truncated: download it again"
            ) from None
    if "model.embed_tokens.weight" in seen:
        seen.add("lm_head.weight")  # tied, or no separate head: the embedding serves
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(
            f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}: "
            "incomplete download?"
        )


def check_file(path: Path, expected: dict, config: M.Config) -> set[str]:
    """One safetensors file's tensors checked against `expected` (name -> shape) -> their names."""
    seen = set()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            name = M.our_name(key, config)
            if name is None:
                continue
            if name not in expected:
                raise UserError(
                    f"unexpected tensor {key!r} in {path}: not a {config.model_type} checkpoint?"
                )
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(expected[name]):
                raise UserError(
                    f"tensor {key!r} in {path} has shape {shape}, expected "
                    f"{tuple(expected[name])}: config.json does not match the weights"
                )
            seen.add(name)
    return seen


def check_config(d: dict, source: str = "config.json") -> dict:
    """config.json's keys -> model.Config's keywords (model.config_keys), each one checked for its
    JSON type and value before and after model.py's reading. A problem is a one-line UserError
    naming `source`."""

    def fail(msg: str):
        raise UserError(f"{source}: {msg}")

    if not isinstance(d, dict):
        fail(f"expected a JSON object, got {type(d).__name__}")
    if d.get("model_type") not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        fail(f"unsupported model_type {d.get('model_type')!r}; supported: {supported}")
    if d["model_type"] == "gemma3" and not isinstance(d.get("text_config") or {}, dict):
        fail(f"`text_config` must be an object, not {json.dumps(d['text_config'])[:80]}")
    raw = M.text_config(d) if d["model_type"] == "gemma3" else d
    raw = M.FAMILY_DEFAULTS.get(raw["model_type"], {}) | raw
    _check_raw(raw, fail)
    keys = M.config_keys(d)
    _check_types(keys, fail)
    _check_values(keys, fail)
    return keys


def _check_raw(d: dict, fail) -> None:
    """What model.config_keys reads as it is: the required keys, the JSON types, `rope_parameters`,
    the keys the sliding layers are derived from, and an encoder's flag."""
    missing = [f.name for f in fields(M.Config) if f.default is MISSING and f.name not in d]
    if missing:
        fail(f"lacks required key(s) {', '.join(missing)}: is this a causal-LM config?")
    _check_types(d, fail)
    rp = d.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        fail(f"`rope_parameters` must be an object, not {rp!r}")
    for k in (M.FULL, M.SLIDING):  # Gemma 3: one entry per layer type
        if not isinstance(rp.get(k) or {}, dict):
            fail(f"`rope_parameters.{k}` must be an object, not {json.dumps(rp[k])[:80]}")
    if ((rp.get(M.SLIDING) or {}).get("rope_type") or "default") != "default":
        fail("`rope_parameters.sliding_attention` scales RoPE: not supported")
    for k in ("sliding_window_pattern", "max_window_layers"):
        if k in d and not (_json_type_ok(d[k], int) and d[k] >= 1):
            fail(f"`{k}` must be an integer of at least 1, not {json.dumps(d[k])[:80]}")
    if d["model_type"] in ("gemma2", "gemma3_text") and d.get("use_bidirectional_attention"):
        fail("`use_bidirectional_attention` is set: an encoder (EmbeddingGemma?), not a causal LM")


def _check_types(d: dict, fail) -> None:
    for f in fields(M.Config):
        if f.name in d and not _json_type_ok(d[f.name], f.type):
            fail(f"`{f.name}` must be {_json_type_name(f.type)}, not {json.dumps(d[f.name])[:80]}")


def _check_values(d: dict, fail) -> None:
    """Config's keywords: sizes, the heads, the activation, the layer types and RoPE's scaling."""
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "sliding_window",
    ):
        if d.get(k) is not None and d[k] < 1:
            fail(f"`{k}` must be at least 1, not {d[k]}")
    kv = d.get("num_key_value_heads") or d["num_attention_heads"]
    if d["num_attention_heads"] % kv:
        fail(
            f"`num_attention_heads` ({d['num_attention_heads']}) "
            f"is not a multiple of `num_key_value_heads` ({kv})"
        )
    if d.get("hidden_act", "silu") not in ("silu", "gelu_pytorch_tanh"):
        fail(f"unsupported activation {d['hidden_act']!r}; implemented: silu, gelu_pytorch_tanh")
    for k in POSITIVE_NUMBERS:  # as read: softcappings a family ignores were dropped
        if d.get(k) is not None and not 0 < d[k] < math.inf:
            fail(f"`{k}` must be a number above 0, not {d[k]}")
    if "rms_norm_eps" in d and not 0 <= d["rms_norm_eps"] < math.inf:
        fail(f"`rms_norm_eps` must be a number of at least 0, not {d['rms_norm_eps']}")
    n, lt = d["num_hidden_layers"], d["layer_types"]
    if not (isinstance(lt, list) and len(lt) == n and all(x in (M.FULL, M.SLIDING) for x in lt)):
        fail(f"`layer_types` must list {n} of {M.FULL}, {M.SLIDING}, not {json.dumps(lt)[:80]}")
    rs = d.get("rope_scaling") or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in ROPE_NEEDS:
        fail(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")
    for k in ROPE_NEEDS[rope_type]:
        if not _json_type_ok(rs.get(k), float) or not 0 < rs[k] < math.inf:
            fail(
                f"`rope_scaling.{k}` must be a number above 0 for rope type {rope_type!r}, "
                f"not {json.dumps(rs.get(k))[:80]}"
            )


def _json_type_ok(value, typ) -> bool:
    """Whether a JSON value fits a Config field type: int, float (an int is fine), bool, str, dict,
    or X | None."""
    options = typ.__args__ if isinstance(typ, types.UnionType) else (typ,)
    for t in options:
        if value is None and t is type(None) or isinstance(value, bool) and t is bool:
            return True
        if isinstance(value, bool):
            continue  # true/false is not a number
        if (
            isinstance(value, int)
            and t in (int, float)
            or isinstance(value, float)
            and t is float
            or isinstance(value, (str, dict, list))
            and t is type(value)
        ):
            return True
    return False


def _json_type_name(typ) -> str:
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "an object",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(
        names[t] for t in (typ.__args__ if isinstance(typ, types.UnionType) else (typ,))
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 is ~6x slower on CPU
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def check_device(device: str) -> str:
    """The device name, if this machine has it; else a UserError (torch would fail later, with an
    AssertionError)."""
    device = str(device)  # train.py passes a torch.device: named as the user wrote it
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {device!r}: no CUDA GPU is available to this PyTorch (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: Apple MPS is not available here; use --device cpu")
    return str(device)


def model_shape(model_name: str) -> tuple[int, int, str]:
    """(num_layers, hidden, model_type) from the model's config.json (no weights are loaded)."""
    from support import hub  # a name may need a download first

    path = hub.resolve(model_name, verbose=False) / "config.json"
    config = read_json(path)
    try:
        if config.get("model_type") == "gemma3":  # multimodal: the language model's shape
            config = config["text_config"] | {"model_type": "gemma3_text"}
        return (
            int(config["num_hidden_layers"]),
            int(config["hidden_size"]),
            config.get("model_type", "unknown"),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(
            f"{path} gives no num_hidden_layers and hidden_size: is {model_name} a model?"
        ) from None
