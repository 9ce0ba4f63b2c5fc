"""Reading a Hugging Face-layout checkpoint safely: config.json checked key by key, safetensors weights checked
tensor by tensor, and the device checked before anything is loaded (model.py's loader builds and assigns)."""
import json
import math
import sys
import types
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from support import UserError
from support.files import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype's names
ROPE_NEEDS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
GEMMA = ("gemma2", "gemma3_text")
# What transformers' config classes assume for a key that a family's config.json leaves out, where
# model.Config's default differs (Gemma 3's hub configs, the multimodal ones' text_config above all,
# omit most of these)
FAMILY_DEFAULTS = {
    "qwen2": dict(max_position_embeddings=32768),
    "qwen3": dict(head_dim=128, max_position_embeddings=32768),
    "gemma2": dict(
        vocab_size=256000, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
    "gemma3_text": dict(
        vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=4096,
        tie_word_embeddings=True, rope_theta=1e6, rope_local_base_freq=1e4)}


def read_config(path: Path, config_class):
    """A config.json -> config_class(...) (model.Config), every key it reads checked by `check_config`."""
    return config_class(**check_config(read_json(path), config_class, str(path)))


def check_config(d: dict, config_class, source: str = "config.json") -> dict:
    """config.json's keys -> the keys of `config_class` (a dataclass), each one checked for its JSON
    type and value, read as transformers reads them: a multimodal Gemma 3's text_config unwrapped,
    the family's defaults, transformers 5's `rope_parameters` unfolded, the sliding layers listed.
    A problem is a one-line UserError naming `source`."""
    def fail(msg: str):
        raise UserError(f"{source}: {msg}")

    if not isinstance(d, dict):
        fail(f"expected a JSON object, got {type(d).__name__}")
    if d.get("model_type") not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        fail(f"unsupported model_type {d.get('model_type')!r}; supported: {supported}")
    d = _text_config(d, fail) if d["model_type"] == "gemma3" else dict(d)
    d = FAMILY_DEFAULTS.get(d["model_type"], {}) | d
    _unfold_rope(d, fail)
    known = fields(config_class)
    missing = [f.name for f in known if f.default is MISSING and f.name not in d]
    if missing:
        fail(f"lacks required key(s) {', '.join(missing)}: is this a causal-LM config?")
    for f in known:
        if f.name in d and not _json_type_ok(d[f.name], f.type):
            fail(f"`{f.name}` must be {_json_type_name(f.type)}, not {json.dumps(d[f.name])[:80]}")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
        if d.get(k) is not None and d[k] < 1:
            fail(f"`{k}` must be at least 1, not {d[k]}")
    kv = d.get("num_key_value_heads") or d["num_attention_heads"]
    if d["num_attention_heads"] % kv:
        fail(f"`num_attention_heads` ({d['num_attention_heads']}) is not a multiple of `num_key_value_heads` ({kv})")
    _check_family(d, fail)
    for k in POSITIVE_NUMBERS:  # as read: softcappings a family ignores were dropped above
        if d.get(k) is not None and not 0 < d[k] < math.inf:
            fail(f"`{k}` must be a number above 0, not {d[k]}")
    if "rms_norm_eps" in d and not 0 <= d["rms_norm_eps"] < math.inf:
        fail(f"`rms_norm_eps` must be a number of at least 0, not {d['rms_norm_eps']}")
    rs = d.get("rope_scaling") or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in ROPE_NEEDS:
        fail(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")
    for k in ROPE_NEEDS[rope_type]:
        if not _json_type_ok(rs.get(k), float) or not 0 < rs[k] < math.inf:
            fail(f"`rope_scaling.{k}` must be a number above 0 for rope type {rope_type!r}, "
                 f"not {json.dumps(rs.get(k))[:80]}")
    return {f.name: d[f.name] for f in known if f.name in d}


def _text_config(d: dict, fail) -> dict:
    """A multimodal Gemma 3 config -> its language model's (text_config), tied as the whole is."""
    text = d.get("text_config") or {}
    if not isinstance(text, dict):
        fail(f"`text_config` must be an object, not {json.dumps(text)[:80]}")
    tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return text | {"model_type": "gemma3_text", "tie_word_embeddings": tied}


def _unfold_rope(d: dict, fail) -> None:
    """transformers 5's `rope_parameters` -> rope_theta and rope_scaling, and Gemma 3's sliding
    layers' theta -> rope_local_base_freq: transformers 4's names, which most hub configs carry."""
    if "rope_parameters" not in d:
        return
    rp = d.pop("rope_parameters") or {}
    if not isinstance(rp, dict):
        fail(f"`rope_parameters` must be an object, not {rp!r}")
    if "full_attention" in rp or "sliding_attention" in rp:  # Gemma 3: one entry per layer type
        for k in ("full_attention", "sliding_attention"):
            if not isinstance(rp.get(k) or {}, dict):
                fail(f"`rope_parameters.{k}` must be an object, not {json.dumps(rp[k])[:80]}")
        local = rp.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            fail("`rope_parameters.sliding_attention` scales RoPE: not supported")
        d["rope_local_base_freq"] = local.get("rope_theta", d.get("rope_local_base_freq", 1e4))
        rp = rp.get("full_attention") or {}
    d["rope_theta"] = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    if rp.get("rope_type", "default") != "default":
        d.setdefault("rope_scaling", rp)


# Config numbers that must be above 0 where set (0 or less gives NaN logits, or a complex scale).
POSITIVE_NUMBERS = ("rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                    "attn_logit_softcapping", "final_logit_softcapping")


def _check_family(d: dict, fail) -> None:
    """The keys only some families read, kept for those (as transformers' classes read them), the
    activation, and `layer_types`: which blocks attend through the sliding window."""
    t, n = d["model_type"], d["num_hidden_layers"]
    if t in GEMMA:  # Gemma reads `hidden_activation`; its config.json's `hidden_act` is a leftover
        d["hidden_act"] = d.get("hidden_activation") or "gelu_pytorch_tanh"
    if d.get("hidden_act", "silu") not in ("silu", "gelu_pytorch_tanh"):
        fail(f"unsupported activation {d['hidden_act']!r}; implemented: silu, gelu_pytorch_tanh")
    unread = ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"]
    unread = {"gemma2": [], "gemma3_text": ["attn_logit_softcapping"]}.get(t, unread)
    for k in unread + ([] if t == "gemma3_text" else ["rope_local_base_freq"]):
        d.pop(k, None)
    if t in GEMMA and d.get("use_bidirectional_attention"):
        fail("`use_bidirectional_attention` is set: an encoder (EmbeddingGemma?), not a causal LM")
    if t in ("qwen2", "qwen3") and not d.get("use_sliding_window") or t == "llama":
        d["sliding_window"] = None  # transformers ignores it then
    if t == "mistral" or d.get("sliding_window") is None:  # Mistral: every layer, if any window
        d["layer_types"] = [_SLIDING if d.get("sliding_window") else _FULL] * n
    elif d.get("layer_types") is None:
        for k in ("sliding_window_pattern", "max_window_layers"):
            if k in d and not (_json_type_ok(d[k], int) and d[k] >= 1):
                fail(f"`{k}` must be an integer of at least 1, not {json.dumps(d[k])[:80]}")
        d["layer_types"] = _default_layer_types(d)
    lt = d["layer_types"]
    if not (isinstance(lt, list) and len(lt) == n and all(x in (_FULL, _SLIDING) for x in lt)):
        fail(f"`layer_types` must list {n} of {_FULL}, {_SLIDING}, not {json.dumps(lt)[:80]}")


_FULL, _SLIDING = "full_attention", "sliding_attention"


def _default_layer_types(d: dict) -> list[str]:
    """transformers' rule for a config written without `layer_types`: Qwen slides from layer
    max_window_layers on; in Gemma every sliding_window_pattern-th layer is global, others slide."""
    n, t = d["num_hidden_layers"], d["model_type"]
    if t.startswith("qwen"):
        return [_SLIDING if i >= d.get("max_window_layers", 28) else _FULL for i in range(n)]
    every = d.get("sliding_window_pattern", 2 if t == "gemma2" else 6)
    return [_FULL if (i + 1) % every == 0 else _SLIDING for i in range(n)]


def _json_type_ok(value, typ) -> bool:
    """Whether a JSON value fits a Config field type: int, float (an int is fine), bool, str, dict, or X | None."""
    options = typ.__args__ if isinstance(typ, types.UnionType) else (typ,)
    for t in options:
        if value is None and t is type(None) or isinstance(value, bool) and t is bool:
            return True
        if isinstance(value, bool):
            continue  # true/false is not a number
        if isinstance(value, int) and t in (int, float) or isinstance(value, float) and t is float \
                or isinstance(value, (str, dict, list)) and t is type(value):
            return True
    return False


def _json_type_name(typ) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
             list: "a list", type(None): "null"}
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


# A multimodal Gemma 3 checkpoint: its language model's tensors under a prefix (as transformers 4
# or 5 wrote it), and the vision tower and its projector, which a text model does not use
MULTIMODAL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                       "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.",
                   "model.vision_tower.", "model.multi_modal_projector.")


def our_name(key: str, model_type: str) -> str | None:
    """A checkpoint's tensor name -> the model's (HF's causal-LM names); None: a tensor not used."""
    if key.endswith("rotary_emb.inv_freq"):  # recomputed
        return None
    if model_type == "gemma3_text":
        if key.startswith(VISION_PREFIXES):
            return None
        for prefix, ours in MULTIMODAL_PREFIXES.items():
            if key.startswith(prefix):
                return ours + key[len(prefix):]
    return key


def read_weights(model_dir: Path, expected: dict, tied: bool, device, dtype, model_type: str) -> dict:
    """Every tensor of the checkpoint, checked against `expected` (name -> shape) -> {name: tensor on device}.

    Harmless extras are skipped (rotary inv_freq, recomputed; lm_head.weight of a tied model; a
    multimodal Gemma 3's vision tower; its language model's prefix is removed); a missing
    lm_head.weight means a tied head. Any other unexpected, missing or misshapen tensor is a
    UserError."""
    files = weight_files(Path(model_dir))
    state = {}
    for n, path in enumerate(files, start=1):
        if len(files) > 1:
            print(f"loading {path.name} ({n}/{len(files)})", file=sys.stderr, flush=True)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = our_name(key, model_type)
                    if name is None or (name == "lm_head.weight" and tied):
                        continue
                    if name not in expected:
                        raise UserError(f"unexpected tensor {key!r} in {path}: not a {model_type} checkpoint?")
                    t = f.get_tensor(key)
                    if t.shape != expected[name]:
                        raise UserError(
                            f"tensor {key!r} in {path} has shape {tuple(t.shape)}, expected "
                            f"{tuple(expected[name])}: config.json does not match the weights")
                    state[name] = t.to(device=device, dtype=dtype)
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
    device = str(device)  # train.py passes a torch.device: named as the user wrote it
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
        if config.get("model_type") == "gemma3":  # multimodal: the language model's shape
            config = config["text_config"] | {"model_type": "gemma3_text"}
        return int(config["num_hidden_layers"]), int(config["hidden_size"]), config.get("model_type", "unknown")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{path} gives no num_hidden_layers and hidden_size: is {model_name} a model?") from None
