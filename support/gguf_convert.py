"""Read a GGUF model file with numpy and turn it into a Hugging Face model directory.

GGUF is llama.cpp's one-file format. Everything is little-endian:

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv      x  key (string), value type (u32), value           -> metadata
    n_tensors x  name (string), n_dims (u32), ne (u64 x n_dims),
                 ggml type (u32), offset (u64)                   -> tensor infos
    zero padding up to `general.alignment` (default 32)
    tensor data: each tensor starts at data_start + its offset

A string is a u64 byte count then UTF-8; an array is an element type (u32), a count (u64), the
elements. `ne` lists dimensions fastest-varying first, the reverse of a PyTorch shape: a [out, in]
weight is stored with ne = [in, out]. Quantized types pack 32 values into a block: Q8_0 is an f16
scale d and 32 int8 (x = d*q); Q4_0 is d and 16 bytes of 4-bit q (x = d*(q-8)); Q4_1 is d, an f16
offset m, and 16 bytes (x = d*q + m). llama.cpp also reorders the rows of the q/k projections for
its rotary embedding, which we undo (see `unpermute_rotary`). Usage:

    # config.json, model.safetensors, ... in out/smollm2
    python -m support.gguf_convert SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2
"""

import json
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from support import UserError
from support.files import remove_stale_temps, temp_path

# Metadata value types. Fixed-size ones map to a numpy dtype; 8 is a string and 9 an array.
_VALUE_DTYPES = {
    0: "u1",
    1: "i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9

# ggml tensor types we decode: id -> (name, values per block, bytes per block).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
GGML_TYPES = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    Q4_0: ("Q4_0", 32, 18),
    Q4_1: ("Q4_1", 32, 20),
    Q8_0: ("Q8_0", 32, 34),
    BF16: ("BF16", 1, 2),
}
# Names of some types we don't decode, only so that the error message can say which one a file uses.
_OTHER_TYPE_NAMES = {
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    28: "F64",
    29: "IQ1_M",
    39: "MXFP4",
}
SUPPORTED = ", ".join(name for name, _, _ in GGML_TYPES.values())


def type_name(ggml_type):
    return GGML_TYPES.get(ggml_type, (None,))[0] or _OTHER_TYPE_NAMES.get(
        ggml_type, f"type {ggml_type}"
    )


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # PyTorch order (slowest-varying first), i.e. ggml's ne reversed
    ggml_type: int
    offset: int  # absolute byte position in the file
    nbytes: int | None  # None for types we cannot decode


class _Reader:
    """Walks the header of a GGUF file; running off its end means the file is truncated."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise UserError(
                f"{self.path}: truncated GGUF header (needs byte {self.pos + n:,}, file has "
                f"{len(self.buf):,}); re-download or re-convert the file"
            )
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, dtype):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()

    def string(self):
        return bytes(self.take(self.scalar("<u8"))).decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<u4"), self.scalar("<u8")
            if etype in _VALUE_DTYPES:  # numbers: one vectorized read instead of `count` small ones
                dtype = np.dtype(_VALUE_DTYPES[etype])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype in _VALUE_DTYPES:
            return self.scalar(_VALUE_DTYPES[vtype])
        raise UserError(f"{self.path}: unknown metadata value type {vtype}; the file is corrupt")


class GGUFFile:
    """A parsed GGUF file. Tensor data stays in a read-only memory map until `dequantize` asks for
    it."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise UserError(
                f"{self.path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF'); "
                "pass the path of a .gguf model file"
            )
        if len(head) < 8:
            raise UserError(
                f"{self.path}: truncated GGUF header ({len(head)} bytes); re-download the file"
            )
        self.version = struct.unpack("<I", head[4:8])[0]
        if self.version not in (
            2,
            3,
        ):  # v1 used 32-bit counts; a byte-swapped 2 or 3 is a big-endian file
            hint = (
                "big-endian files are not supported"
                if self.version in (2 << 24, 3 << 24)
                else "use v2 or v3"
            )
            raise UserError(
                f"{self.path}: unsupported GGUF version {self.version} ({hint}); "
                "re-convert with a recent llama.cpp"
            )
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        r = _Reader(memoryview(self.data), self.path)
        r.pos = 8
        n_tensors, n_kv = r.scalar("<u8"), r.scalar("<u8")
        self.metadata = {}
        for _ in range(n_kv):
            key = r.string()
            self.metadata[key] = r.value(r.scalar("<u4"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            ne = [r.scalar("<u8") for _ in range(r.scalar("<u4"))]
            infos.append((name, tuple(reversed(ne)), r.scalar("<u4"), r.scalar("<u8")))
        self.alignment = self.metadata.get("general.alignment", 32)
        # round up to a multiple of alignment
        data_start = -(-r.pos // self.alignment) * self.alignment
        self.tensors = {}
        for name, shape, ggml_type, offset in infos:
            nbytes = None
            if ggml_type in GGML_TYPES:
                type_str, block, block_bytes = GGML_TYPES[ggml_type]
                if int(np.prod(shape)) % block:
                    raise UserError(
                        f"{self.path}: tensor {name!r} of shape {shape} does not fill "
                        f"whole {type_str} blocks of {block}; the file is corrupt"
                    )
                nbytes = int(np.prod(shape)) // block * block_bytes
            end = data_start + offset + (nbytes or 0)
            if end > len(self.data):
                raise UserError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte "
                    f"{end:,} but the file has {len(self.data):,}; re-download the file"
                )
            self.tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset, nbytes)

    def raw(self, name):
        """The tensor's bytes, as a view into the memory map (nothing is read yet)."""
        info = self.tensors[name]
        if info.nbytes is None:
            raise UserError(
                f"{self.path}: tensor {name!r} has type "
                f"{type_name(info.ggml_type)}, which this reader cannot decode "
                f"(supported: {SUPPORTED}); use a GGUF quantized to one of those"
            )
        return self.data[info.offset : info.offset + info.nbytes]

    def dequantize(self, name):
        """The tensor as a float32 array in PyTorch layout, e.g. [out, in] for a linear weight."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape)


def _f16(two_bytes):
    """[n, 2] uint8 -> [n, 1] float32; f16 -> f32 is exact."""
    return two_bytes.view("<f2").astype(np.float32)


def dequantize(raw, ggml_type, shape):
    """Decode a tensor's raw bytes to float32, with the same float32 arithmetic as ggml (so
    bit-exact).

    >>> d = [0x00, 0x38]  # the scale d = 0.5 as f16, then 32 int8 values
    >>> block = np.array(d + list(range(-16, 16)), dtype=np.int8).view(np.uint8)
    >>> dequantize(block, Q8_0, (32,))[:4]
    array([-8. , -7.5, -7. , -6.5], dtype=float32)
    """
    if ggml_type == F32:
        out = raw.view("<f4").astype(np.float32)
    elif ggml_type == F16:
        out = raw.view("<f2").astype(np.float32)
    elif ggml_type == BF16:  # bf16 is the top half of a float32
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif ggml_type == Q8_0:
        blocks = raw.reshape(-1, 34)
        out = blocks[:, 2:].view(np.int8).astype(np.float32) * _f16(blocks[:, :2])
    elif ggml_type in (Q4_0, Q4_1):
        blocks = raw.reshape(-1, GGML_TYPES[ggml_type][2])
        packed = blocks[:, -16:]
        # Value j of a block is the low nibble of byte j, value j+16 the high nibble of the same
        # byte.
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1)
        if ggml_type == Q4_0:
            out = (q.astype(np.int8) - np.int8(8)).astype(np.float32) * _f16(blocks[:, :2])
        else:
            # multiply, round to float32, then add: what gguf-py does (and ggml's C, unless fused)
            out = _f16(blocks[:, :2]) * q.astype(np.float32) + _f16(blocks[:, 2:4])
    else:
        raise UserError(f"cannot decode ggml type {type_name(ggml_type)} (supported: {SUPPORTED})")
    return out.reshape(shape)


def permute_rotary(w, n_heads):
    """What llama.cpp's converter does to the rows of q_proj/k_proj; `unpermute_rotary` undoes it.

    Hugging Face rotates each head's first half against its second half (row i pairs with row i +
    d/2); llama.cpp rotates neighbouring rows (2i with 2i+1), so the converter interleaves the two
    halves. One head of dimension 6:

    >>> permute_rotary(np.arange(6), n_heads=1)
    array([0, 3, 1, 4, 2, 5])
    """
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_rotary(w, n_heads):
    """Back from llama.cpp's interleaved rows to Hugging Face's [first half | second half] per head.

    >>> unpermute_rotary(np.array([0, 3, 1, 4, 2, 5]), n_heads=1)
    array([0, 1, 2, 3, 4, 5])
    """
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IN_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name):
    """The Hugging Face Llama name of a GGUF tensor.

    >>> hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    """
    base, kind = gguf_name.rsplit(".", 1)
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _IN_BLOCK:
        return f"model.layers.{parts[1]}.{_IN_BLOCK[parts[2]]}.{kind}"
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{kind}"
    raise UserError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart; only plain Llama "
        "models are supported"
    )


def _check_llama(g):
    arch = g.metadata.get("general.architecture")
    if arch != "llama":
        raise UserError(
            f"{g.path}: architecture {arch!r} is not supported (only 'llama'); "
            "use a Llama-family GGUF such as SmolLM2"
        )


def hf_tensors(g):
    """Yield (Hugging Face name, float32 array) one tensor at a time, in file order."""
    _check_llama(g)
    n_head = g.metadata["llama.attention.head_count"]
    n_kv = g.metadata.get("llama.attention.head_count_kv", n_head)
    for name in g.tensors:
        w = g.dequantize(name)
        if ".attn_q." in name:
            w = unpermute_rotary(w, n_head)
        elif ".attn_k." in name:
            w = unpermute_rotary(w, n_kv)
        yield hf_name(name), w


def hf_config(g):
    """config.json for transformers' LlamaForCausalLM (and for our own model code)."""
    _check_llama(g)
    m = g.metadata
    n_head, d = m["llama.attention.head_count"], m["llama.embedding_length"]

    def f32(x):  # shortest spelling of a float32 value: 1e-05, not 9.99999974e-06
        return float(str(np.float32(x)))

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": m["llama.feed_forward_length"],
        "num_hidden_layers": m["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": m.get("llama.attention.head_count_kv", n_head),
        "head_dim": m.get("llama.attention.key_length", d // n_head),
        "rms_norm_eps": f32(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": f32(m.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": m.get("llama.context_length", 2048),
        "vocab_size": g.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
        "mlp_bias": False,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": m.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "converted_from_gguf": g.path.name,
    }


_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types; 1 is a normal token
# Pre-tokenizers llama.cpp names `pre`. For smollm (and starcoder-like vocabularies) llama.cpp first
# splits off every digit (\p{N}), then applies GPT-2's regex; the real SmolLM2 tokenizer.json says
# the same with Sequence[Digits(individual_digits), ByteLevel].
_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
_DIGITS_THEN_BYTE_LEVEL = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
}
PRE_TOKENIZERS = {
    "smollm": _DIGITS_THEN_BYTE_LEVEL,
    "starcoder": _DIGITS_THEN_BYTE_LEVEL,
    "refact": _DIGITS_THEN_BYTE_LEVEL,
    "codeshell": _DIGITS_THEN_BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
}


def tokenizer_json(g):
    """tokenizer.json (Hugging Face `tokenizers` format) for a byte-level BPE vocabulary in the
    GGUF."""
    m = g.metadata
    model, pre = m.get("tokenizer.ggml.model"), m.get("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in PRE_TOKENIZERS:
        raise UserError(
            f"{g.path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported "
            f"(byte-level BPE 'gpt2' with pre {sorted(PRE_TOKENIZERS)} is); use a SmolLM2 GGUF"
        )
    tokens = m["tokenizer.ggml.tokens"]
    types = m.get("tokenizer.ggml.token_type", [1] * len(tokens))
    # Control tokens (<|im_start|>, ...) must be matched whole in the text, never split by BPE.
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == _CONTROL,
        }
        for i, (t, kind) in enumerate(zip(tokens, types))
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": m.get("tokenizer.ggml.merges", []),
        },
    }


def tokenizer_config(g):
    m, tokens = g.metadata, g.metadata["tokenizer.ggml.tokens"]

    def token(key):
        return tokens[m[key]] if key in m else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # i.e. "use tokenizer.json as it is"
        "add_bos_token": bool(m.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": m.get("llama.context_length", 2048),
        "chat_template": m.get("tokenizer.chat_template"),
    }


def tensor_types(g) -> str:
    """How the GGUF stored its tensors, most common type first, e.g. 'Q4_1 x210, F32 x61, Q8_0
    x1'."""
    counts = {}
    for info in g.tensors.values():
        counts[type_name(info.ggml_type)] = counts.get(type_name(info.ggml_type), 0) + 1
    return ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _write_safetensors(path, g):
    """Stream float32 tensors into a .safetensors file, one at a time, so memory stays at one
    tensor.

    The format: u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw
    data.
    """
    meta = {
        "format": "pt",
        "converted_from_gguf": g.path.name,
        "gguf_tensor_types": tensor_types(g),
    }
    header, start = {"__metadata__": meta}, 0
    for info in g.tensors.values():
        n = 4 * int(np.prod(info.shape))
        header[hf_name(info.name)] = {
            "dtype": "F32",
            "shape": list(info.shape),
            "data_offsets": [start, start + n],
        }
        start += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data should start 8-byte aligned
    t0, n = time.time(), len(g.tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for i, (name, w) in enumerate(hf_tensors(g), 1):
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
            if i % 40 == 0 or i == n:
                print(f"  {i}/{n} tensors, {time.time() - t0:.1f}s", file=sys.stderr)


def convert_gguf(gguf_path, out_dir):
    """Write a Hugging Face model directory (float32 weights) for a Llama GGUF and return its path.

    Everything goes to a temporary sibling directory that is renamed into place at the end, so an
    interrupted conversion never leaves a half-written `out_dir`; one killed outright (kill -9)
    leaves that directory, which the next conversion deletes.
    """
    g, out_dir = GGUFFile(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; delete it to convert again")
    # Fail before writing anything: every tensor must have a name and a type we can decode.
    config, tok, tok_config = hf_config(g), tokenizer_json(g), tokenizer_config(g)
    for info in g.tensors.values():
        hf_name(info.name)
        g.raw(info.name)
    print(f"converting {g.path.name} -> {out_dir}", file=sys.stderr)
    for stale in remove_stale_temps(
        out_dir
    ):  # a conversion killed with -9 left its folder (~250 MB) behind
        print(f"removed {stale}, left by an interrupted conversion", file=sys.stderr)
    tmp = temp_path(out_dir)
    tmp.mkdir(parents=True)
    try:
        _write_safetensors(tmp / "model.safetensors", g)
        files = {
            "config.json": config,
            "tokenizer.json": tok,
            "tokenizer_config.json": tok_config,
            "generation_config.json": {
                "bos_token_id": config["bos_token_id"],
                "eos_token_id": config["eos_token_id"],
            },
        }
        for name, content in files.items():
            (tmp / name).write_text(
                json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m support.gguf_convert MODEL.gguf OUT_DIR")
    print(convert_gguf(sys.argv[1], sys.argv[2]))
