"""Steering specs, units, layers and the multi-layer variant (persona_vectors.steering / generate
--steer)."""

import pytest
import torch
from tiny import make_tiny_chat_model, write_vector

import model as M
import persona_vectors as pv
from support import checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    return d, model


def test_parse_steer_spec():
    parse = pv.SteerSpec.parse
    assert parse("evil:1.5") == pv.SteerSpec("evil", 1.5, False, "evil:1.5")
    assert parse("dir/v.safetensors:-2") == pv.SteerSpec(
        "dir/v.safetensors", -2.0, False, "dir/v.safetensors:-2"
    )
    assert parse("humorous:0.1r") == pv.SteerSpec("humorous", 0.1, True, "humorous:0.1r")
    assert parse(parse("evil:1")) == parse("evil:1")  # parsed once: a parsed spec passes through
    for bad in ["evil", "evil:", ":1", "evil:abc", "evil:1.5x"]:
        with pytest.raises(ValueError, match="TRAIT:COEF"):
            parse(bad)
    for bad in ["evil:nan", "evil:inf", "evil:-infr"]:
        with pytest.raises(ValueError, match="finite"):
            parse(bad)


def test_units_layers_and_lookup(tiny, tmp_path):
    d, model = tiny
    vec = torch.randn(4, 64)
    write_vector(tmp_path / "evil_response_avg_diff.safetensors", vec)
    (s,) = pv.steering(["evil:2"], model, tmp_path)
    assert (
        s.layer == 1
        and s.coef == 2.0
        and torch.equal(s.vector, vec[1])
        and s.positions == "response"
    )
    (s,) = pv.steering(["evil:0.5r"], model, tmp_path, layer=2)
    # a relative coefficient adds 0.5 x the mean residual norm at that layer (12.0 here) along v
    assert s.layer == 2 and s.coef == pytest.approx(0.5 * 12.0 / float(vec[2].norm()))
    assert float((s.coef * s.vector).norm()) == pytest.approx(0.5 * 12.0)
    write_vector(tmp_path / "best.safetensors", vec, best_layer=3)
    assert pv.steering([f"{tmp_path}/best.safetensors:1"], model)[0].layer == 3  # its own layer
    two = pv.steering(
        ["evil:1", f"{tmp_path}/best.safetensors:-1"], model, tmp_path, positions="all"
    )
    assert [(s.layer, s.coef, s.positions) for s in two] == [(1, 1.0, "all"), (3, -1.0, "all")]


def test_all_layers_adds_increments(tiny, tmp_path):
    d, model = tiny
    vec = torch.randn(4, 64)
    write_vector(tmp_path / "evil_response_avg_diff.safetensors", vec)
    steer = pv.steering(["evil:1.5"], model, tmp_path, all_layers=True)
    assert [s.layer for s in steer] == [1, 2, 3]
    for s in steer:
        assert s.coef == 1.5 and torch.equal(s.vector, vec[s.layer] - vec[s.layer - 1])
    # together they add coef * (v[l] - v[0]) by block l: check on the residual after the last block
    ids = torch.tensor([[5, 6, 7]])
    cap = M.Capture(token_layers=(3,))
    with torch.no_grad():
        model(ids, steer=[M.Steer(3, s.vector, s.coef) for s in steer], capture=cap, logits="none")
    base = M.Capture(token_layers=(3,))
    with torch.no_grad():
        model(ids, capture=base, logits="none")
    torch.testing.assert_close(
        cap.tokens[3][0] - base.tokens[3][0],
        (1.5 * (vec[3] - vec[0])).expand(1, 3, 64),
        atol=1e-5,
        rtol=1e-5,
    )


def test_errors(tiny, tmp_path):
    d, model = tiny
    with pytest.raises(ValueError, match="run `extract evil` first"):
        pv.steering(["evil:1"], model, tmp_path)
    write_vector(
        tmp_path / "other.safetensors",
        torch.randn(31, 576),
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    with pytest.raises(
        ValueError, match=r"\[31, 576\] \(extracted from HuggingFaceTB/SmolLM2-135M-Instruct\)"
    ):
        pv.steering([f"{tmp_path}/other.safetensors:1"], model)
    write_vector(tmp_path / "evil_response_avg_diff.safetensors", torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"--layer 4 out of range.*1\.\.3"):
        pv.steering(["evil:1"], model, tmp_path, layer=4)
    with pytest.raises(ValueError, match="does not exist"):
        pv.steering([f"{tmp_path}/missing.safetensors:1"], model)


def test_generate_with_steering(tiny, tmp_path):
    d, _ = tiny
    vec = torch.randn(4, 64)
    write_vector(tmp_path / "evil_response_avg_diff.safetensors", vec)
    kw = dict(model=str(d), max_new_tokens=8, vectors=str(tmp_path), device="cpu")
    base = pv.generate(["Hello", "What is 2 + 2?"], **kw)
    assert pv.generate(["Hello", "What is 2 + 2?"], steer=["evil:0"], **kw) == base
    steered = pv.generate(["Hello", "What is 2 + 2?"], steer=["evil:8"], layer=2, **kw)
    # the same as generating by hand with the vector added at block 2 (response positions)
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in ("Hello", "What is 2 + 2?")]
    by_hand = M.generate(
        model,
        ids,
        8,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        steer=[M.Steer(2, vec[2], 8.0, "response")],
    )
    assert steered == [tok.decode(o) for o in by_hand] and steered != base
    with pytest.raises(pv.UserError, match="overflows"):
        pv.generate(["Hello"], steer=["evil:1e30"], **kw)
