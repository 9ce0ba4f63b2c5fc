"""model.py against an independent reference (Hugging Face transformers) and its exact invariants.

The tiny random checkpoints and reference outputs in tests/golden/tiny-*/ come from
tests/make_golden_models.py.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import model as M
from support import UserError, checkpoint, cpu_speed

GOLDEN = Path(__file__).parent / "golden"
TINY = ["tiny-llama3", "tiny-qwen2", "tiny-tied", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3"]


def tiny(name: str) -> M.Transformer:
    return M.load_model(GOLDEN / name, "cpu", torch.float32)


def hidden_states(m: M.Transformer, ids, **kw) -> torch.Tensor:
    """Every token's state at every hidden index -> [N + 1, B, T, d]."""
    cap = M.Capture(token_layers=tuple(range(m.config.num_hidden_layers + 1)))
    m(ids, logits="none", capture=cap, **kw)
    return torch.stack([cap.tokens[i][0] for i in range(m.config.num_hidden_layers + 1)])


@pytest.fixture(params=[True, False], ids=["fused", "written-out"])
def attention_path(request, monkeypatch):
    """Run a test with the fused attention kernel (the default) and with `M.attention` written
    out."""
    monkeypatch.setattr(M, "FUSED_ATTENTION", request.param)


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers_golden(name, attention_path):
    m, ref = tiny(name), load_file(GOLDEN / name / "reference.safetensors")
    assert (m(ref["ids_single"]) - ref["logits_single"]).abs().max() <= 1e-4
    mask = ref["mask_batch"]
    got = m(ref["ids_batch"], attention_mask=mask) * mask[..., None]
    assert (got - ref["logits_batch"]).abs().max() <= 1e-4
    assert (hidden_states(m, ref["ids_single"])[:, 0] - ref["hidden_single"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers_live(name, tmp_path):
    pytest.importorskip("transformers")
    import make_golden_models as golden

    ref = golden.reference_outputs(GOLDEN / name, golden.CONFIGS[name])
    m = tiny(name)
    assert (m(ref["ids_single"]) - ref["logits_single"]).abs().max() <= 1e-4
    got = m(ref["ids_batch"], attention_mask=ref["mask_batch"]) * ref["mask_batch"][..., None]
    assert (got - ref["logits_batch"]).abs().max() <= 1e-4


def test_parity_test_can_fail(tmp_path):
    """Dropping the llama3 rope scaling (or the qwen2 bias) must visibly change the logits."""
    ref = load_file(GOLDEN / "tiny-llama3" / "reference.safetensors")
    d = tmp_path / "no-scaling"
    shutil.copytree(GOLDEN / "tiny-llama3", d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_scaling"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert (
        M.load_model(d, "cpu", torch.float32)(ref["ids_single"]) - ref["logits_single"]
    ).abs().max() > 1e-2


def test_default_model_type_errors(tmp_path):
    base = json.loads((GOLDEN / "tiny-llama3" / "config.json").read_text())
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2"):
        checkpoint.check_config(base | {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="hidden_size"):
        checkpoint.check_config({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        checkpoint.check_config(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    # transformers >= 5 writes rope settings as `rope_parameters`
    c = M.Config(
        **checkpoint.check_config(
            {k: v for k, v in base.items() if k not in ("rope_scaling", "rope_theta")}
            | {"rope_parameters": base["rope_scaling"] | {"rope_theta": 5e5}}
        )
    )
    assert c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"hidden_size": "576"}, r"config.json: `hidden_size` must be an integer, not \"576\""),
        ({"num_hidden_layers": 2.5}, "`num_hidden_layers` must be an integer, not 2.5"),
        ({"tie_word_embeddings": "yes"}, "`tie_word_embeddings` must be true or false"),
        ({"rms_norm_eps": None}, "`rms_norm_eps` must be a number, not null"),
        ({"num_attention_heads": 0}, "`num_attention_heads` must be at least 1, not 0"),
        ({"num_key_value_heads": 3}, "not a multiple of `num_key_value_heads`"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "`rope_scaling.low_freq_factor` must be a number",
        ),
        ({"rope_parameters": "fast"}, "`rope_parameters` must be an object"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, edit, message):
    d = corrupt(tmp_path)
    (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text()) | edit))
    with pytest.raises(UserError, match=message) as e:
        checkpoint.load_model(d, "cpu")
    assert str(e.value).startswith(str(d / "config.json")) and "\n" not in str(e.value)


def test_unreadable_config_and_index_name_the_file(tmp_path):
    d = corrupt(tmp_path)
    (d / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(UserError, match=r"config.json: invalid JSON at line 1, column 24"):
        checkpoint.load_model(d, "cpu")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="config.json: expected a JSON object, got list"):
        checkpoint.load_model(d, "cpu")
    shutil.copy(GOLDEN / "tiny-llama3" / "config.json", d / "config.json")
    (d / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(
        UserError, match="model.safetensors.index.json: expected an object with a `weight_map`"
    ):
        checkpoint.load_model(d, "cpu")
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(UserError, match="model.safetensors.index.json: invalid JSON"):
        checkpoint.load_model(d, "cpu")


def test_a_folder_without_safetensors_names_the_fix(tmp_path):
    d = tmp_path / "bin-only"
    d.mkdir()
    shutil.copy(GOLDEN / "tiny-tied" / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="no model.safetensors.*convert .bin checkpoints first"):
        checkpoint.load_model(d, "cpu")


def test_a_device_this_machine_lacks_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        UserError, match="device 'cuda': no CUDA GPU is available.*use --device cpu"
    ):
        checkpoint.load_model(GOLDEN / "tiny-tied", "cuda")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        checkpoint.load_model(GOLDEN / "tiny-tied", "gpu")
    with pytest.raises(UserError, match="^device 'cuda': no CUDA"):  # as train.py passes it
        # said "device(type='cuda')"
        checkpoint.load_model(GOLDEN / "tiny-tied", torch.device("cuda"))


def test_load_records_the_source_of_the_weights(tmp_path):
    from tiny import make_tiny_chat_model

    d = make_tiny_chat_model(tmp_path / "m")
    m, _ = checkpoint.load(str(d), "cpu")
    assert m.source == {
        "repo": None,
        "path": str(d),
        "origin": "local",
        "revision": None,
        "quantization": None,
    }


def corrupt(tmp_path, name="tiny-llama3"):
    d = tmp_path / name
    shutil.copytree(GOLDEN / name, d)
    return d


def test_weight_errors_name_the_tensor_and_file(tmp_path):
    """support.checkpoint checks the files' headers first (one-line errors naming the tensor and
    the file); model.load_model alone is as strict, with torch's and safetensors' own errors."""
    d = corrupt(tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    w = load_file(shard)
    key = sorted(k for k in w if k.startswith("model.layers."))[0]

    def refused(message, strict_error=RuntimeError):
        with pytest.raises(UserError, match=message) as e:
            checkpoint.load_model(d, "cpu")
        assert "\n" not in str(e.value)
        with pytest.raises(strict_error):
            M.load_model(d, "cpu")

    save_file(w | {key: w[key][:-1]}, shard)
    refused(f"{key}.*model-00001-of-00002.safetensors.*shape")
    save_file(w | {"model.layers.9.mlp.up_proj.weight": w[key].clone()}, shard)
    refused("unexpected tensor 'model.layers.9.mlp.up_proj.weight'")
    save_file({k: v for k, v in w.items() if k != key}, shard)
    refused("lacks 1 tensor")
    data = (GOLDEN / "tiny-llama3" / shard.name).read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    refused("truncated", SafetensorError)
    shard.unlink()
    refused("missing or truncated", OSError)


def test_tied_head_shares_the_embedding():
    m = tiny("tiny-tied")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert tiny("tiny-qwen2").lm_head.weight is not tiny("tiny-qwen2").model.embed_tokens.weight


@pytest.mark.parametrize("name", TINY)
def test_cached_decode_equals_full_recompute(name, attention_path):
    m, ref = tiny(name), load_file(GOLDEN / name / "reference.safetensors")
    ids, mask = ref["ids_batch"], ref["mask_batch"]
    full = m(ids, attention_mask=mask)
    cache = M.KVCache(m.config, ids.shape[0], ids.shape[1], "cpu", torch.float32)
    # prefill 18 columns (one row is still all padding there), then decode one token at a time
    split = 18
    steps = [m(ids[:, :split], attention_mask=mask[:, :split], cache=cache, logits="last")]
    for t in range(split, ids.shape[1]):
        steps.append(m(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache))
    got = torch.cat(steps, 1)
    # fp32 rounding only
    torch.testing.assert_close(got, full[:, split - 1 :], rtol=1e-5, atol=1e-4)


def test_batched_generation_equals_one_at_a_time():
    m = tiny("tiny-qwen2")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    batched = M.generate(m, prompts, max_new_tokens=12, stop_ids={3}, pad_id=0)
    single = [M.generate(m, [p], max_new_tokens=12, stop_ids={3}, pad_id=0)[0] for p in prompts]
    assert batched == single
    # and greedy generation is the argmax of a full forward over prompt + output
    for p, out in zip(prompts, batched):
        logits = m(torch.tensor([p + out]))[0, len(p) - 1 : -1]
        assert logits.argmax(-1).tolist() == out


def test_generation_stops_per_row_and_excludes_the_stop_token():
    m = tiny("tiny-llama3")
    free = M.generate(m, [[5, 6, 7], [40, 41]], max_new_tokens=10)
    stop = free[0][3]  # make row 0 stop at its 4th token
    out = M.generate(m, [[5, 6, 7], [40, 41]], max_new_tokens=10, stop_ids={stop})
    assert out[0] == free[0][: free[0].index(stop)]
    assert stop not in out[1] and out[1] == free[1][: len(out[1])]


@pytest.mark.parametrize("name", TINY)
def test_at_least_one_new_token_even_when_the_first_choice_is_a_stop_token(name):
    m, prompts = tiny(name), [[5, 6, 7], [40, 41, 42, 43]]
    first = [out[0] for out in M.generate(m, prompts, 1)]
    stop = set(first)  # each row's greedy first token is a stop token
    cap = M.Capture()
    outs = M.generate(m, prompts, 6, stop_ids=stop, capture=cap)
    for b, (p, out) in enumerate(zip(prompts, outs)):
        # reference: the best token other than the stop tokens, then plain greedy decoding until a
        # stop token
        logits = m(torch.tensor([p]))[0, -1]
        logits[sorted(stop)] = -math.inf
        ref = [int(logits.argmax())]
        while len(ref) < 6:
            nxt = int(m(torch.tensor([p + ref]))[0, -1].argmax())
            if nxt in stop:
                break
            ref.append(nxt)
        assert out == ref and len(out) >= 1
        full = M.Capture()
        m(torch.tensor([p + out]), answer_start=torch.tensor([len(p)]), capture=full, logits="none")
        assert cap.counts["answer"][b] == len(out)
        torch.testing.assert_close(
            cap.answer_mean()[b], full.answer_mean()[0], rtol=1e-5, atol=1e-5
        )
    # sampling obeys the same rule: a nucleus holding only the top token still avoids the stop
    # tokens
    sampled = M.generate(m, prompts, 1, stop_ids=stop, temperature=1.0, top_p=1e-6, seed=0)
    assert [out[0] for out in sampled] == [out[0] for out in outs]


def test_empty_spans_are_nan_not_zero():
    m, ref = tiny("tiny-tied"), load_file(GOLDEN / "tiny-tied" / "reference.safetensors")
    ids, mask = ref["ids_batch"], ref["mask_batch"]
    T = ids.shape[1]
    cap = M.Capture()
    # row 1: no answer
    m(ids, attention_mask=mask, answer_start=torch.tensor([10, T, 15]), capture=cap, logits="none")
    assert cap.answer_mean()[1].isnan().all() and cap.answer_norm()[1].isnan().all()
    assert cap.answer_mean()[[0, 2]].isfinite().all() and cap.answer_norm()[[0, 2]].isfinite().all()
    assert cap.prompt_mean().isfinite().all() and cap.prompt_last().isfinite().all()


def test_generate_rejects_no_tokens():
    m = tiny("tiny-llama3")  # max_position_embeddings 256
    for bad in (0, -4, 256):
        with pytest.raises(UserError, match=f"max_new_tokens {bad} not in 1..255"):
            M.generate(m, [[5, 6]], bad)
    with pytest.raises(UserError, match="empty prompt"):
        M.generate(m, [[5, 6], []], 4)


def test_generation_past_the_context_warns(capsys):
    m = tiny("tiny-llama3")  # max_position_embeddings 256
    capsys.readouterr()
    M.generate(m, [[5] * 250], 6)
    assert capsys.readouterr().err == ""
    M.generate(m, [[5] * 250], 7)
    assert (
        "250 prompt tokens + 7 new ones exceed the model's context of 256 tokens"
        in capsys.readouterr().err
    )


def test_sampling_is_seeded_and_top_p_small_is_greedy():
    m = tiny("tiny-llama3")
    a = M.generate(m, [[5, 6, 7]] * 4, 16, temperature=1.0, seed=1)
    assert a == M.generate(m, [[5, 6, 7]] * 4, 16, temperature=1.0, seed=1)
    assert a != M.generate(m, [[5, 6, 7]] * 4, 16, temperature=1.0, seed=2)
    assert M.generate(m, [[5, 6, 7]], 16, temperature=1.0, top_p=1e-6, seed=3) == M.generate(
        m, [[5, 6, 7]], 16
    )


def test_zero_steering_is_bit_identical():
    m, ref = tiny("tiny-llama3"), load_file(GOLDEN / "tiny-llama3" / "reference.safetensors")
    v = torch.randn(64)
    steer = [
        M.Steer(layer, v, 0.0, pos) for layer, pos in [(1, "all"), (2, "response"), (3, "prompt")]
    ]
    kw = dict(attention_mask=ref["mask_batch"], answer_start=torch.tensor([10, 20, 15]))
    assert torch.equal(m(ref["ids_batch"], **kw), m(ref["ids_batch"], steer=steer, **kw))
    out = M.generate(m, [[5, 6, 7]], 8)
    assert out == M.generate(m, [[5, 6, 7]], 8, steer=steer)


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steering_changes_exactly_the_chosen_layer_and_positions(positions):
    m, ref = tiny("tiny-qwen2"), load_file(GOLDEN / "tiny-qwen2" / "reference.safetensors")
    ids, mask = ref["ids_batch"], ref["mask_batch"]
    start = torch.tensor([14, 20, 15])  # response begins at these columns
    kw = dict(attention_mask=mask, answer_start=start)
    L, v, coef = 2, torch.randn(64), 1.5
    base = hidden_states(m, ids, **kw)
    steered = hidden_states(m, ids, steer=[M.Steer(L, v, coef, positions)], **kw)
    assert torch.equal(steered[:L], base[:L])  # indices below the steered one are untouched
    cols = torch.arange(ids.shape[1])[None]
    # "response" starts at the last prompt token, as the official hook does (see M.Steer)
    chosen = {
        "all": torch.ones_like(mask, dtype=torch.bool),
        "prompt": (cols < start[:, None]) & mask.bool(),
        "response": (cols >= start[:, None] - 1) & mask.bool(),
    }[positions]
    assert torch.equal(steered[L][chosen], (base[L] + coef * v)[chosen])
    assert torch.equal(steered[L][~chosen], base[L][~chosen])
    if positions == "response":  # no prompt position before the last one changes, at any layer
        early = (cols < start[:, None] - 1) & mask.bool()
        assert torch.equal(steered[:, early], base[:, early])
    assert not torch.allclose(steered[L + 1][chosen], base[L + 1][chosen])


def official_hook(block: torch.nn.Module, positions: str, vector: torch.Tensor):
    """The official persona-vectors steering hook (ActivationSteerer), rewritten: on a block's
    output [B, T, d], "all" adds the vector everywhere, "prompt" everywhere but only in calls of
    more than one token (the prefill), "response" at the last position of every call."""

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        if positions == "all" or (positions == "prompt" and h.shape[1] > 1):
            h += vector
        elif positions == "response":
            h[:, -1] += vector
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return block.register_forward_hook(hook)


def hooked_greedy(m: M.Transformer, prompt: list[int], n: int, L: int, vector, positions):
    """Greedy decoding with a KV cache, one forward call per token, steered by `official_hook` on
    block L alone -> (new tokens, logits [n, vocab] each token was chosen from)."""
    handle = official_hook(m.model.layers[L - 1], positions, vector)
    try:
        cache = M.KVCache(m.config, 1, len(prompt) + n, "cpu", torch.float32)
        logits = m(torch.tensor([prompt]), cache=cache, logits="last")[0, -1]
        tokens, steps = [], []
        for _ in range(n):
            steps.append(logits)
            tokens.append(int(logits.argmax()))
            logits = m(torch.tensor([[tokens[-1]]]), cache=cache, logits="last")[0, -1]
    finally:
        handle.remove()
    return tokens, torch.stack(steps)


@pytest.mark.parametrize("positions", ["response", "prompt", "all"])
@pytest.mark.parametrize("name, L", [("tiny-llama3", 2), ("tiny-qwen2", 1), ("tiny-tied", 2)])
def test_steered_generation_equals_the_official_hook(name, L, positions):
    m = tiny(name)
    v = 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(L))
    prompts, n = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 40], [20, 21, 22, 23, 24]], 10
    steer = [M.Steer(L, v, 1.0, positions)]
    got = M.generate(m, prompts, n, steer=steer)  # batched, left-padded
    for p, out in zip(prompts, got):
        tokens, logits = hooked_greedy(m, p, n, L, v, positions)
        assert out == tokens
        # one forward over prompt + answer, steered the same way, gives the logits each token was
        # sampled from
        full = m(torch.tensor([p + out]), answer_start=torch.tensor([len(p)]), steer=steer)[
            0, len(p) - 1 : -1
        ]
        torch.testing.assert_close(full, logits, rtol=1e-5, atol=1e-4)
    if (
        positions == "response"
    ):  # the first token already differs from unsteered generation for some prompt
        plain = M.generate(m, prompts, n)
        assert any(a[0] != b[0] for a, b in zip(got, plain))


@pytest.mark.parametrize("positions", ["response", "prompt"])
@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3"])
def test_steered_generation_equals_the_official_hook_on_transformers(name, positions):
    """Layer L is block L's output in every family (Gemma's: after the post-feedforward add)."""
    transformers = pytest.importorskip("transformers")
    L, n = 2, 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        GOLDEN / name, dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None  # no stop token, like M.generate without stop_ids
    hf.generation_config.pad_token_id = 0
    m, v = tiny(name), 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    steer = [M.Steer(L, v, 1.0, positions)]
    for p in [[5, 6, 7, 8, 9, 10, 11], [30, 31, 32]]:
        handle = official_hook(hf.model.layers[L - 1], positions, v)
        try:
            with torch.no_grad():
                ref = hf.generate(
                    torch.tensor([p]),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    use_cache=True,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
        finally:
            handle.remove()
        out = M.generate(m, [p], n, steer=steer)[0]
        assert out == ref.sequences[0, len(p) :].tolist()
        full = m(torch.tensor([p + out]), answer_start=torch.tensor([len(p)]), steer=steer)[
            0, len(p) - 1 : -1
        ]
        torch.testing.assert_close(full, torch.cat(ref.logits), rtol=1e-4, atol=1e-4)


def test_several_vectors_and_layers_add_up():
    m, ids = tiny("tiny-llama3"), torch.tensor([[5, 6, 7, 8, 9]])
    v1, v2 = torch.randn(64), torch.randn(64)
    base = hidden_states(m, ids)
    both = hidden_states(m, ids, steer=[M.Steer(1, v1, 2.0), M.Steer(1, v2, -1.0)])
    assert torch.allclose(both[1], base[1] + 2.0 * v1 - v2, atol=1e-6)


def test_per_row_steering_equals_each_row_steered_alone():
    """Steer.vector [B, hidden]: each row gets its own vector (zeros: none), as if generated alone
    with it."""
    m = tiny("tiny-qwen2")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    v, w = torch.randn(3, 64), torch.randn(3, 64)
    v[2] = 0  # row 2: no steering at layer 2
    w[0] = 0  # row 0: no steering of the response at layer 1
    batched = M.generate(
        m, prompts, 10, steer=[M.Steer(2, 3 * v, 1.0, "all"), M.Steer(1, 2 * w, 1.0, "response")]
    )
    alone = [
        M.generate(m, [prompts[0]], 10, steer=[M.Steer(2, v[0], 3.0, "all")]),
        M.generate(
            m,
            [prompts[1]],
            10,
            steer=[M.Steer(2, v[1], 3.0, "all"), M.Steer(1, w[1], 2.0, "response")],
        ),
        M.generate(m, [prompts[2]], 10, steer=[M.Steer(1, w[2], 2.0, "response")]),
    ]
    assert batched == [a[0] for a in alone]
    assert batched != M.generate(m, prompts, 10)  # the steering does change the answers
    # the states: at index 2, row 0 changes by exactly 1.5 v[0] and row 1 not at all; each row as if
    # alone
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    base = hidden_states(m, ids)
    both = hidden_states(m, ids, steer=[M.Steer(2, torch.stack([v[0], torch.zeros(64)]), 1.5)])
    assert torch.equal(both[:2], base[:2]) and torch.equal(both[2, 1], base[2, 1])
    assert torch.equal(both[2, 0], base[2, 0] + 1.5 * v[0])
    torch.testing.assert_close(
        both[:, 0], hidden_states(m, ids[:1], steer=[M.Steer(2, v[0], 1.5)])[:, 0]
    )
    torch.testing.assert_close(both[:, 1], hidden_states(m, ids[1:])[:, 0])
    with pytest.raises(RuntimeError):  # 3 vectors for 2 rows
        m(ids, steer=[M.Steer(2, torch.randn(3, 64))])


def test_ablation_removes_the_direction():
    m, ids = tiny("tiny-llama3"), torch.tensor([[5, 6, 7, 8, 9, 10]])
    u = torch.randn(64)
    h = hidden_states(m, ids, ablate=[M.Ablate(2, u)])
    assert (h[2] @ (u / u.norm())).abs().max() < 1e-4
    assert (h[1] @ (u / u.norm())).abs().max() > 1e-2


def test_captured_means_equal_means_of_full_hidden_states():
    m, ref = tiny("tiny-tied"), load_file(GOLDEN / "tiny-tied" / "reference.safetensors")
    ids, mask = ref["ids_batch"], ref["mask_batch"].bool()
    start = torch.tensor([14, 20, 15])
    cap = M.Capture()
    m(ids, attention_mask=mask, answer_start=start, capture=cap, logits="none")
    full = hidden_states(m, ids, attention_mask=mask, answer_start=start)  # [N + 1, B, T, d]
    cols = torch.arange(ids.shape[1])
    for b in range(ids.shape[0]):
        prompt = mask[b] & (cols < start[b])
        resp = mask[b] & (cols >= start[b])
        assert torch.allclose(cap.prompt_mean()[b], full[:, b, prompt].mean(1), atol=1e-5)
        assert torch.allclose(cap.answer_mean()[b], full[:, b, resp].mean(1), atol=1e-5)
        assert torch.equal(cap.prompt_last()[b], full[:, b, start[b] - 1])


def test_capture_during_generation_matches_teacher_forcing():
    m = tiny("tiny-qwen2")
    prompts = [[5, 6, 7, 8], [9, 10]]
    cap = M.Capture()
    outs = M.generate(m, prompts, max_new_tokens=6, capture=cap)
    for b, (p, out) in enumerate(zip(prompts, outs)):
        ref = M.Capture()
        m(torch.tensor([p + out]), answer_start=torch.tensor([len(p)]), capture=ref, logits="none")
        assert torch.allclose(cap.prompt_mean()[b], ref.prompt_mean()[0], atol=1e-5)
        assert torch.allclose(cap.answer_mean()[b], ref.answer_mean()[0], atol=1e-5)
        assert torch.allclose(cap.prompt_last()[b], ref.prompt_last()[0], atol=1e-5)
        assert torch.allclose(cap.answer_norm()[b], ref.answer_norm()[0], atol=1e-4)
        assert cap.counts["answer"][b] == len(out)
    # a row that stops early: its stop token and the filler after it are not part of the response
    # first seen at >= 2
    stop = next(t for i, t in enumerate(outs[0]) if i >= 2 and t not in outs[0][:i])
    cap = M.Capture()
    stopped = M.generate(m, prompts, max_new_tokens=6, stop_ids={stop}, capture=cap)
    assert stopped[0] == outs[0][: outs[0].index(stop)] and cap.counts["answer"][0] == len(
        stopped[0]
    )
    outs = stopped
    ref = M.Capture()
    m(
        torch.tensor([prompts[0] + outs[0]]),
        answer_start=torch.tensor([4]),
        capture=ref,
        logits="none",
    )
    assert torch.allclose(cap.answer_mean()[0], ref.answer_mean()[0], atol=1e-5)


def test_bad_interventions_fail_clearly():
    """An index past the model, or an unknown span, would steer nothing silently: refused at the
    first call. A vector of another size fails in torch. (The values, finite and not too large,
    are the callers' to check: files.load_vector, the --steer parser and `steering`.)"""
    m, ids = tiny("tiny-llama3"), torch.tensor([[5, 6, 7]])
    with pytest.raises(UserError, match=r"layer out of range in \[4\]: hidden indices are 0\.\.3"):
        m(ids, steer=[M.Steer(4, torch.randn(64))])
    with pytest.raises(UserError, match=r"layer out of range in \[-1\]"):
        m(ids, ablate=[M.Ablate(-1, torch.randn(64))])
    with pytest.raises(UserError, match="positions must be all, prompt or response, not 'middle'"):
        m(ids, steer=[M.Steer(1, torch.randn(64), 1.0, "middle")])
    with pytest.raises(RuntimeError):
        m(ids, steer=[M.Steer(1, torch.randn(32))])


def test_training_with_steering_and_checkpointing():
    m = tiny("tiny-llama3").train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    steer = [M.Steer(2, torch.randn(64), 0.5)]

    def grads():
        m.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(ids, steer=steer)[0, :-1], ids[0, 1:])
        loss.backward()
        return loss.detach(), m.model.layers[0].mlp.up_proj.weight.grad.clone()

    loss, g = grads()
    m.gradient_checkpointing = True
    loss2, g2 = grads()
    assert torch.allclose(loss, loss2) and torch.allclose(g, g2, atol=1e-6) and g.abs().sum() > 0


def test_split_linear_equals_f_linear():
    torch.manual_seed(0)
    lin = cpu_speed.split_linears(torch.nn.Linear(48, 96, bias=True))
    assert type(lin) is cpu_speed.SplitLinear
    threads = torch.get_num_threads()
    try:
        for g in (2, 3, 5):  # 5 does not divide 96: plain F.linear
            torch.set_num_threads(g)
            for shape in [
                (1, 48),
                (3, 1, 48),
                (4, 16, 48),
                (2, 40, 48),
            ]:  # the last has 80 rows: plain F.linear
                x = torch.randn(*shape, requires_grad=True)
                y = lin(x)
                torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
                y.sum().backward()  # differentiable like nn.Linear
                torch.testing.assert_close(x.grad, lin.weight.sum(0).expand_as(x))
    finally:
        torch.set_num_threads(threads)


def test_the_cpu_split_is_applied_from_outside_and_changes_no_output():
    """model.py's layers are plain nn.Linear; the loader gives them the split on the CPU, and taking
    it away again gives the same generations and captured states."""
    m = M.Transformer(M.Config("llama", 96, 64, 112, 2, 4, 2))
    assert {type(x) for x in m.modules() if isinstance(x, torch.nn.Linear)} == {torch.nn.Linear}
    m = checkpoint.load_model(GOLDEN / "tiny-llama3", "cpu", torch.float32)
    linears = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert len(linears) == 3 * 7 + 1 and all(type(x) is cpu_speed.SplitLinear for x in linears)

    def run():
        cap = M.Capture()
        return M.generate(m, [[5, 6, 7], [40, 41, 42, 43]], 8, capture=cap), cap.answer_mean()

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the split needs at least two threads
        split = run()
        cpu_speed.split_linears(m, on=False)
        assert type(m.lm_head) is torch.nn.Linear
        assert run()[0] == split[0]
        torch.testing.assert_close(run()[1], split[1])
    finally:
        torch.set_num_threads(threads)


def test_written_out_attention_equals_the_fused_kernel():
    """`M.attention` (scores, mask, softmax, weighted sum, grouped-query heads) against
    F.scaled_dot_product_attention, as the model calls it: a padding mask, plain causal (no mask),
    and one new token over a cache."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for H, H_kv, T, S, masked in (
            (4, 2, 7, 7, True),
            (6, 2, 5, 9, True),
            (4, 1, 6, 6, False),
            (4, 4, 1, 9, False),
        ):
            q = torch.randn(2, H, T, 16, generator=g).to(dtype)
            k, v = (torch.randn(2, H_kv, S, 16, generator=g).to(dtype) for _ in range(2))
            mask = None
            if masked:  # a random mask in which every query sees at least itself
                mask = (torch.rand(2, 1, T, S, generator=g) < 0.6) | (
                    torch.arange(S) == torch.arange(S - T, S)[:, None]
                )
            for scale in (None, 0.3):  # 1/√hd, or Gemma's query_pre_attn_scalar ** -0.5
                fused = torch.nn.functional.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    enable_gqa=H != H_kv,
                    is_causal=mask is None and T > 1,
                    scale=scale,
                )
                ours = M.attention(q, k, v, mask, scale)
                torch.testing.assert_close(ours, fused, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", TINY)
def test_written_out_attention_gives_the_models_outputs(name, monkeypatch):
    m, ref = tiny(name), load_file(GOLDEN / name / "reference.safetensors")
    ids, mask = ref["ids_batch"], ref["mask_batch"]

    def run():
        cap = M.Capture()
        out = M.generate(m, [[5, 6, 7, 8, 9, 10, 11], [12, 13]], 10, capture=cap)
        return (
            m(ids, attention_mask=mask) * mask[..., None],
            m(ref["ids_single"]),
            out,
            cap.answer_mean(),
        )

    fused = run()
    monkeypatch.setattr(M, "FUSED_ATTENTION", False)
    written = run()
    assert written[2] == fused[2]
    for a, b in zip(written[:2] + written[3:], fused[:2] + fused[3:]):
        # fp32 rounding only, as the cache test
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_interventions_are_checked_once_per_sequence_not_per_token(monkeypatch):
    m, calls = tiny("tiny-llama3"), []
    check = M.Transformer.start_sequence
    monkeypatch.setattr(M.Transformer, "start_sequence", lambda *a: calls.append(a) or check(*a))
    M.generate(m, [[5, 6, 7]], 12, steer=[M.Steer(2, torch.randn(64), 1.0)])
    assert len(calls) == 1


def test_model_py_copied_alone_runs(tmp_path):
    """model.py imports no project module at module level: a copy alone builds, runs, and fails
    clearly."""
    import subprocess
    import sys

    shutil.copy(Path(M.__file__), tmp_path / "model.py")
    # model.UserError, a ValueError
    script = (
        "import torch, model as M\n"
        "m = M.Transformer(M.Config('llama', 96, 64, 112, 2, 4, 2)).eval()\n"
        "assert m(torch.tensor([[5, 6, 7]]), steer=[M.Steer(1, torch.ones(64))]).shape "
        "== (1, 3, 96)\n"
        "try:\n"
        "    m(torch.tensor([[5]]), steer=[M.Steer(1, torch.ones(64), positions='middle')])\n"
        "except ValueError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "UserError positions must be all, prompt or response, not 'middle'"


def test_model_py_reads_as_a_tutorial():
    """Issue 25: model.py within 650 lines (as formatted by ruff, which .ci/run checks), none over
    100 columns, no function over 50 lines (its decorators included)."""
    import ast

    src = Path(M.__file__).read_text(encoding="utf-8")
    lines = src.splitlines()
    assert len(lines) <= 650 and max(map(len, lines)) <= 100
    functions = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)]
    lengths = {
        f.name: f.end_lineno - min([f.lineno] + [d.lineno for d in f.decorator_list]) + 1
        for f in functions
    }
    assert max(lengths.values()) <= 50, lengths
