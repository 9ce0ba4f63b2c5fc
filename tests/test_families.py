"""Qwen3, Gemma 2 and Gemma 3 beside Llama, Qwen2 and Mistral: each family's own features show in
the logits, its configs are read as transformers reads them (4.x and 5.x style, the multimodal
Gemma 3 wrapper), and batched, left-padded generation gives each row what it gets alone, in float32
and bfloat16.

Parity with transformers (logits and every hidden index, golden and live) is in tests/test_model.py,
whose TINY list holds these families too.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import GOLDEN, TINY, tiny

import model as M
from support import UserError, checkpoint

NEW = ["tiny-qwen3", "tiny-gemma2", "tiny-gemma3"]


def edited(tmp_path, name: str, edit: dict) -> M.Transformer:
    d = tmp_path / name
    shutil.copytree(GOLDEN / name, d)
    (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text()) | edit))
    return checkpoint.load_model(d, "cpu", torch.float32)  # checked first: one-line errors


def max_error(m: M.Transformer, ref: dict) -> float:
    """max |Δlogit| against the golden reference, on one sequence and on the left-padded batch."""
    mask = ref["mask_batch"]
    batch = m(ref["ids_batch"], attention_mask=mask) * mask[..., None]
    single = m(ref["ids_single"])
    return max(
        (single - ref["logits_single"]).abs().max(), (batch - ref["logits_batch"]).abs().max()
    ).item()


@pytest.mark.parametrize(
    "name, edit",
    [
        ("tiny-qwen3", {"rope_theta": 10000.0}),
        ("tiny-gemma2", {"sliding_window": None}),  # the window: 5 of 24 tokens
        (
            "tiny-gemma2",
            {"layer_types": ["full_attention", "sliding_attention"] * 2},
        ),  # which layers slide
        ("tiny-gemma2", {"attn_logit_softcapping": None}),
        ("tiny-gemma2", {"final_logit_softcapping": None}),
        ("tiny-gemma2", {"query_pre_attn_scalar": 24}),
        ("tiny-gemma2", {"hidden_activation": "silu"}),
        ("tiny-gemma3", {"sliding_window": None}),
        ("tiny-gemma3", {"sliding_window_pattern": 2}),
        ("tiny-gemma3", {"rope_local_base_freq": 1e6}),  # the local layers' own RoPE base
        ("tiny-gemma3", {"rope_scaling": None}),  # the global layer's linear scaling
        ("tiny-gemma3", {"query_pre_attn_scalar": 32}),
    ],
)
def test_each_family_feature_shows_in_the_logits(tmp_path, name, edit):
    """The parity tests can fail: without any one of these features the logits move past 1e-4."""
    ref = load_file(GOLDEN / name / "reference.safetensors")
    assert max_error(tiny(name), ref) <= 1e-4
    assert max_error(edited(tmp_path, name, edit), ref) > 1e-2


def test_gemma_embeddings_are_scaled_before_hidden_index_0():
    m, ids = tiny("tiny-gemma2"), torch.tensor([[5, 6, 7]])
    cap = M.Capture(token_layers=(0,))
    m(ids, logits="none", capture=cap)
    assert torch.equal(cap.tokens[0][0], m.model.embed_tokens(ids) * torch.tensor(64**0.5))


@pytest.mark.parametrize("name", NEW)
def test_configs_as_transformers_5_writes_them(tmp_path, name):
    """transformers 5 saves rope_parameters (Gemma 3: one per layer type) and layer_types."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path / name
    shutil.copytree(GOLDEN / name, d)
    transformers.AutoConfig.from_pretrained(d).save_pretrained(d)
    saved = json.loads((d / "config.json").read_text())
    assert "rope_parameters" in saved and "layer_types" in saved and "rope_theta" not in saved
    ref = load_file(GOLDEN / name / "reference.safetensors")
    assert max_error(M.load_model(d, "cpu", torch.float32), ref) <= 1e-4


# Hub configs leave keys out (a multimodal Gemma 3's text_config most): transformers' defaults apply
HUB_LIKE = [
    {
        "model_type": "gemma3",
        "text_config": {  # shaped like google/gemma-3-4b-it's, most keys left to the defaults
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    },
    {
        "model_type": "gemma3_text",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "vocab_size": 262144,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "rope_scaling": None,
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
    },
    {
        "model_type": "gemma2",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
    },
    {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "rope_theta": 1000000.0,
    },
    {
        "model_type": "qwen2",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 2,
    },
]


@pytest.mark.parametrize("config", HUB_LIKE, ids=lambda c: c["model_type"])
def test_missing_keys_get_the_defaults_transformers_gives_them(config):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoConfig.for_model(**config)
    theirs = getattr(theirs, "text_config", theirs)
    ours = M.Config(**checkpoint.check_config(config))
    if getattr(theirs, "head_dim", None) is None:  # Qwen2: hidden_size / num_attention_heads
        theirs.head_dim = theirs.hidden_size // theirs.num_attention_heads
    for key in (
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "layer_types",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
    ):
        assert getattr(ours, key) == getattr(theirs, key, None), key
    rope = theirs.rope_parameters
    if ours.model_type == "gemma3_text":
        assert ours.rope_local_base_freq == rope["sliding_attention"]["rope_theta"]
        assert rope["sliding_attention"]["rope_type"] == "default"
        rope = rope["full_attention"]
    assert ours.rope_theta == rope["rope_theta"]
    assert (ours.rope_scaling or {}).get("factor") == (
        rope.get("factor") if rope["rope_type"] != "default" else None
    )
    assert ours.hidden_act == getattr(
        theirs, "hidden_activation", getattr(theirs, "hidden_act", None)
    )


def multimodal(tmp_path, prefix: str, head: str, style5: bool):
    """tiny-gemma3 as the language model of a multimodal Gemma 3 checkpoint (stand-in vision)."""
    d = tmp_path / "gemma3-mm"
    d.mkdir()
    text = json.loads((GOLDEN / "tiny-gemma3" / "config.json").read_text())
    if style5:  # transformers 5 style: rope per layer type, the layer types listed
        for k in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"):
            text.pop(k)
        text |= {
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            "layer_types": ["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
        }
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
        "tie_word_embeddings": False,
    }
    (d / "config.json").write_text(json.dumps(config))
    w = {}
    for shard in sorted((GOLDEN / "tiny-gemma3").glob("model-*.safetensors")):
        w |= load_file(shard)
    w = {
        (head if k == "lm_head.weight" else prefix + k.removeprefix("model.")): v
        for k, v in w.items()
    }
    vision = "model.vision_tower." if style5 else "vision_tower."
    w[vision + "vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 4, 4)
    w[vision.replace("vision_tower", "multi_modal_projector") + "mm_input_projection_weight"] = (
        torch.randn(8, 64)
    )
    save_file(w, d / "model.safetensors")
    return d


# as transformers 5 saves them
@pytest.mark.parametrize(
    "prefix, head, style5",
    [
        (
            "language_model.model.",
            "language_model.lm_head.weight",
            False,
        ),  # as the hub's files (transformers 4)
        ("model.language_model.", "lm_head.weight", True),
    ],
)
def test_the_language_model_of_a_multimodal_gemma3_checkpoint_loads(tmp_path, prefix, head, style5):
    d = multimodal(tmp_path, prefix, head, style5)
    m = M.load_model(d, "cpu", torch.float32)
    assert (
        m.config.model_type == "gemma3_text"
        and m.config.layer_types == tiny("tiny-gemma3").config.layer_types
    )
    assert max_error(m, load_file(GOLDEN / "tiny-gemma3" / "reference.safetensors")) <= 1e-4
    assert checkpoint.model_shape(str(d)) == (4, 64, "gemma3_text")
    w = load_file(d / "model.safetensors")
    save_file(
        w | {prefix + "layers.9.mlp.up_proj.weight": torch.zeros(96, 64)}, d / "model.safetensors"
    )
    with pytest.raises(
        UserError,
        match="unexpected tensor 'language_model.model.layers.9|unexpected tensor 'model.la",
    ):
        checkpoint.load_model(d, "cpu")
    with pytest.raises(RuntimeError, match="Unexpected key.*layers.9.mlp.up_proj.weight"):
        M.load_model(d, "cpu")  # alone, as strict


def test_a_vision_tower_in_a_text_only_checkpoint_is_still_unexpected(tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(GOLDEN / "tiny-tied", d)
    w = load_file(d / "model.safetensors")
    save_file(w | {"vision_tower.x": torch.zeros(2)}, d / "model.safetensors")
    with pytest.raises(UserError, match="unexpected tensor 'vision_tower.x'"):
        checkpoint.load_model(d, "cpu")
    with pytest.raises(RuntimeError, match="Unexpected key.*vision_tower.x"):
        M.load_model(d, "cpu")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            {"layer_types": ["sliding_attention"] * 3},
            "`layer_types` must list 4 of full_attention, sliding_attention",
        ),
        ({"layer_types": ["local"] * 4}, "`layer_types` must list 4 of full_attention"),
        (
            {"hidden_activation": "relu"},
            "unsupported activation 'relu'; implemented: silu, gelu_pytorch_tanh",
        ),
        ({"use_bidirectional_attention": True}, "`use_bidirectional_attention` is set: an encoder"),
        ({"sliding_window": 0}, "`sliding_window` must be at least 1, not 0"),
        (
            {"sliding_window_pattern": "6"},
            '`sliding_window_pattern` must be an integer of at least 1, not "6"',
        ),
        (
            {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
            "sliding_attention` scales RoPE: not supported",
        ),
        # each of these crashed (AttributeError, a complex scale) or gave NaN logits before
        ({"rope_parameters": {"full_attention": [1]}}, "`rope_parameters.full_attention` must be"),
        ({"rope_parameters": {"sliding_attention": "x"}}, "`rope_parameters.sliding_attention` mu"),
        ({"query_pre_attn_scalar": -4}, "`query_pre_attn_scalar` must be a number above 0, not -4"),
        ({"final_logit_softcapping": 0.0}, "`final_logit_softcapping` must be a number above 0"),
        ({"rope_local_base_freq": -1}, "`rope_local_base_freq` must be a number above 0, not -1"),
        ({"rope_theta": 0}, "`rope_theta` must be a number above 0, not 0"),
        ({"rms_norm_eps": -1.0}, "`rms_norm_eps` must be a number of at least 0, not -1.0"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 0}},
            "`rope_scaling.factor` must be a number above 0 for rope type 'linear', not 0",
        ),
    ],
)
def test_family_config_errors_are_one_line(tmp_path, edit, message):
    with pytest.raises(UserError, match=message) as e:
        edited(tmp_path, "tiny-gemma3", edit)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path))


def test_the_sliding_window_holds_with_the_cache_and_left_padding():
    """Decoding one token at a time over a cache, and left padding: the window counts tokens."""
    m = tiny("tiny-gemma2")  # window 5
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    full = m(ids)
    cache = M.KVCache(m.config, 1, 20, "cpu", torch.float32)
    steps = [m(ids[:, :3], cache=cache, logits="last")] + [
        m(ids[:, t : t + 1], cache=cache) for t in range(3, 20)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 2:], rtol=1e-5, atol=1e-5)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 7), torch.ones(1, 20)], 1).long()
    torch.testing.assert_close(m(padded, attention_mask=mask)[:, 7:], full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", TINY)
def test_batched_left_padded_generation_gives_each_row_what_it_gets_alone(name, dtype):
    """Prompts of 12, 2 and 7 tokens, 10 new ones, past the Gemma windows (5, 6): no NaN."""
    m = M.load_model(GOLDEN / name, "cpu", dtype)
    prompts = [list(range(5, 17)), [12, 13], [20, 21, 22, 23, 24, 25, 26]]
    batched = M.generate(m, prompts, max_new_tokens=10)
    assert batched == [M.generate(m, [p], max_new_tokens=10)[0] for p in prompts]
    ids, mask = M.left_pad(prompts)
    assert m(ids, attention_mask=mask).isfinite().all()  # padding queries too


@pytest.mark.parametrize("name", NEW)
def test_training_through_each_family_with_checkpointing(name):
    """Gradients reach every norm (q/k norms, Gemma's extra norms) and recomputing the blocks in the
    backward pass (gradient checkpointing) changes none of them."""
    m = tiny(name).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])  # longer than the Gemma windows

    def grads():
        m.zero_grad()
        logits = m(ids, steer=[M.Steer(1, torch.ones(64), 0.5)])[0, :-1]
        torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    plain = grads()
    m.gradient_checkpointing = True
    again = grads()
    assert all(plain[k].abs().sum() > 0 for k in plain if "norm" in k)
    for k in plain:
        torch.testing.assert_close(again[k], plain[k], rtol=1e-5, atol=1e-6)
