"""Regenerate the tiny random checkpoints in tests/golden/tiny-*/ and their reference outputs.

    pip install transformers accelerate && python tests/make_golden_models.py [tiny-NAME ...]

Each directory is a Hugging Face-layout checkpoint (config.json + safetensors, two of them sharded
with model.safetensors.index.json) with random weights drawn here, so the weights do not depend on
any library's initialisation. `reference.safetensors` holds what Hugging Face transformers computes
on them in fp32:
  ids_single [1, T], logits_single [1, T, V], hidden_single [N + 1, T, d] (index N before the final
  norm), ids_batch [B, T] (left-padded), mask_batch [B, T], logits_batch [B, T, V] (padding
  positions zeroed).
tests/test_model.py compares model.py against these (and against live transformers when installed).
Produced with transformers 5.24.0, torch 2.13.0 (CPU), 2026-11-29; tiny-qwen3, tiny-gemma2 and
tiny-gemma3 on 2026-12-07 (naming them writes only those; no name: all).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent / "golden"

CONFIGS = {
    # Llama-3.1 style: llama3 rope scaling, grouped-query attention, untied head, sharded
    "tiny-llama3": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Qwen2 style: bias on q/k/v only, rope theta 1e6, untied head, sharded
    "tiny-qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        use_sliding_window=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Mistral-style config with tied embeddings (no lm_head.weight in the file) and head_dim !=
    # hidden / heads
    "tiny-tied": dict(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        sliding_window=None,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Qwen3: per-head q/k RMSNorm, head_dim 32 != 64 / 4, no qkv bias, tied head (as the small
    # Qwen3 models), sharded
    "tiny-qwen3": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=3,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Gemma 2 as transformers 4 wrote it (no layer_types: layers 0 and 2 slide): a window of 5 of
    # the 24 tokens, both soft-caps far inside the values they bound, query_pre_attn_scalar !=
    # head_dim, tied, sharded
    "tiny-gemma2": dict(
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=32,
        sliding_window=5,
        attn_logit_softcapping=10.0,
        final_logit_softcapping=5.0,
        attention_bias=False,
        cache_implementation="hybrid",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ),
    # Gemma 3 text, transformers 4 style (sliding_window_pattern 3: layers 0, 1 and 3 slide, 2 is
    # global; the local RoPE base, linear RoPE scaling on the global layer): q/k norms, one kv head,
    # untied, sharded
    "tiny-gemma3": dict(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling=dict(rope_type="linear", factor=4.0),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=24,
        sliding_window=6,
        sliding_window_pattern=3,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        attention_bias=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ),
}


def random_weights(c: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim", d // c["num_attention_heads"])
    nq, nkv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    r = lambda *shape, s: torch.randn(*shape, generator=g) * s  # noqa: E731
    gemma = c["model_type"].startswith("gemma")
    one = 0.0 if gemma else 1.0  # Gemma's norms store weight - 1
    norm = lambda n: one + r(n, s=0.2)  # noqa: E731
    w = {"model.embed_tokens.weight": r(V, d, s=1.0), "model.norm.weight": norm(d)}
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = r(V, d, s=d**-0.5)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # large enough weights that attention is far from uniform: a wrong rotary or mask shows in
        # the logits
        w |= {
            p + "self_attn.q_proj.weight": r(nq, d, s=0.5),
            p + "self_attn.k_proj.weight": r(nkv, d, s=0.5),
            p + "self_attn.v_proj.weight": r(nkv, d, s=d**-0.5),
            p + "self_attn.o_proj.weight": r(d, nq, s=nq**-0.5),
            p + "mlp.gate_proj.weight": r(f, d, s=d**-0.5),
            p + "mlp.up_proj.weight": r(f, d, s=d**-0.5),
            p + "mlp.down_proj.weight": r(d, f, s=f**-0.5),
            p + "input_layernorm.weight": norm(d),
            p + "post_attention_layernorm.weight": norm(d),
        }
        if gemma:
            w |= {
                p + "pre_feedforward_layernorm.weight": norm(d),
                p + "post_feedforward_layernorm.weight": norm(d),
            }
        if c["model_type"] in ("qwen3", "gemma3_text"):  # scale ~2: scores far from uniform
            w |= {
                p + "self_attn.q_norm.weight": 1 + norm(hd),
                p + "self_attn.k_norm.weight": 1 + norm(hd),
            }
        if c["model_type"] == "qwen2":
            w |= {
                p + "self_attn.q_proj.bias": r(nq, s=0.5),
                p + "self_attn.k_proj.bias": r(nkv, s=0.5),
                p + "self_attn.v_proj.bias": r(nkv, s=0.1),
            }
    return w


def write_checkpoint(out: Path, config: dict, weights: dict, shards: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        return
    keys = list(weights)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[s::shards]}
        save_file(part, out / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def reference_outputs(model_dir: Path, config: dict) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    V, T = config["vocab_size"], 24
    ids = torch.randint(3, V, (1, T), generator=g)
    lengths = [24, 9, 17]
    ids_b = torch.zeros(len(lengths), T, dtype=torch.long)
    mask_b = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids_b[b, T - n :] = torch.randint(3, V, (n,), generator=g)
        mask_b[b, T - n :] = 1
    pre_norm = {}
    hf.model.layers[-1].register_forward_hook(
        lambda m, i, o: pre_norm.update(h=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[:-1] + (pre_norm["h"],))[:, 0]
        pos = (mask_b.cumsum(-1) - 1).clamp(min=0)
        logits_b = hf(ids_b, attention_mask=mask_b, position_ids=pos).logits * mask_b[..., None]
    return {
        "ids_single": ids,
        "logits_single": out.logits.contiguous(),
        "hidden_single": hidden.contiguous(),
        "ids_batch": ids_b,
        "mask_batch": mask_b,
        "logits_batch": logits_b.contiguous(),
    }


if __name__ == "__main__":
    import sys

    for seed, (name, config) in enumerate(CONFIGS.items()):
        if sys.argv[1:] and name not in sys.argv[1:]:
            continue
        out = HERE / name
        write_checkpoint(
            out, config, random_weights(config, seed), shards=1 if name == "tiny-tied" else 2
        )
        save_file(reference_outputs(out, config), out / "reference.safetensors")
        print("wrote", out)
