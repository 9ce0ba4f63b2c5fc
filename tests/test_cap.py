"""model.Cap (persona capping, h <- h - u * max(h.u - ceiling, 0)) against its exact invariants and
against the same formula applied by a forward hook on Hugging Face transformers."""

import pytest
import torch
from safetensors.torch import load_file
from test_model import GOLDEN, TINY, hidden_states, tiny

import model as M
from support import UserError

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


def batch(name: str):
    ref = load_file(GOLDEN / name / "reference.safetensors")
    return ref["ids_batch"], ref["mask_batch"]


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    u = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return u / u.norm(dim=-1, keepdim=True)


def capped(h: torch.Tensor, u: torch.Tensor, ceiling) -> torch.Tensor:
    """The formula on states h [..., d], in fp32: what the capped index must hold."""
    return h.float() - (h.float() @ u - ceiling).clamp(min=0)[..., None] * u


def medians(h: torch.Tensor, u: torch.Tensor, layers, mask) -> torch.Tensor:
    """Per capped index, the median projection of the real tokens: a ceiling that half of them
    exceed."""
    return torch.stack([(h[L] @ u[j])[mask.bool()].median() for j, L in enumerate(layers)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_infinite_ceiling_is_no_intervention(dtype):
    m = M.load_model(GOLDEN / "tiny-llama3", "cpu", dtype)
    ids, mask = batch("tiny-llama3")
    kw = dict(attention_mask=mask, answer_start=torch.tensor([10, 20, 15]))
    none = M.Cap([1, 2, 3], unit(3, 64), torch.full((3,), float("inf")), "all")
    assert torch.equal(m(ids, **kw), m(ids, cap=[none], **kw))
    assert none.fired.tolist() == [0, 0, 0]
    assert M.generate(m, PROMPTS, 8) == M.generate(m, PROMPTS, 8, cap=[none])


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
@pytest.mark.parametrize("name", TINY)
def test_capped_states_are_at_most_the_ceiling_and_the_others_untouched(name, positions):
    m, (ids, mask) = tiny(name), batch(name)
    start, layers = torch.tensor([14, 20, 15]), [1, 2]
    kw = dict(attention_mask=mask, answer_start=start)
    u = unit(2, 64, seed=1)
    base = hidden_states(m, ids, **kw)  # [N + 1, B, T, d]
    c = medians(base, u, layers, mask)
    got = hidden_states(m, ids, cap=[M.Cap(layers, u, c, positions)], **kw)
    cols = torch.arange(ids.shape[1])[None]
    chosen = (
        mask.bool()
        & {
            "all": cols >= 0,
            "prompt": cols < start[:, None],
            "response": cols >= start[:, None] - 1,
        }[positions]
    )
    assert torch.equal(got[0], base[0])  # below the first capped index nothing changes
    # at the first one: exactly the chosen positions above the ceiling move
    over = chosen & (base[1] @ u[0] > c[0])
    assert over.any() and (chosen & ~over).any()
    keep = mask.bool() & ~over  # (padding, which no real token sees, may be capped under "all")
    assert torch.equal(got[1][keep], base[1][keep])
    torch.testing.assert_close(got[1][over], capped(base[1][over], u[0], c[0]), rtol=0, atol=1e-5)
    for j, L in enumerate(
        layers
    ):  # and after every capped block, no chosen position is above its ceiling
        assert (got[L][chosen] @ u[j]).max() <= c[j] + 1e-5
    if positions != "all":  # a position the cap may not touch keeps a state above the ceiling
        assert (got[1][mask.bool() & ~chosen] @ u[0]).max() > c[0]


def test_in_bf16_the_cap_holds_to_one_rounding_and_leaves_the_rest_bit_identical():
    m, ids = (
        M.load_model(GOLDEN / "tiny-qwen2", "cpu", torch.bfloat16),
        torch.tensor([list(range(5, 30))]),
    )
    u = unit(1, 64, seed=2)
    base = hidden_states(m, ids)
    c = medians(base, u, [2], torch.ones_like(ids))
    got = hidden_states(m, ids, cap=[M.Cap([2], u, c)])
    over = base[2] @ u[0] > c[0]
    assert torch.equal(got[2][~over], base[2][~over]) and over.any()
    # one bf16 rounding of each element moves h.u by at most |h| 2^-9
    rounding = 2**-8 * got[2].norm(dim=-1)
    assert ((got[2] @ u[0] - c[0]) <= rounding).all()
    torch.testing.assert_close(
        got[2][over], capped(base[2][over], u[0], c[0]), rtol=0, atol=float(rounding.max())
    )


def cap_hook(module: torch.nn.Module, u: torch.Tensor, ceiling: torch.Tensor):
    """The cap written as a forward hook on a transformers decoder layer: its output h [B, T, d] is
    replaced by h - u * relu(h.u - ceiling); ceiling is [] or [B]."""

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        excess = torch.relu(torch.einsum("btd,d->bt", h, u) - ceiling.reshape(-1, 1))
        h = h - excess.unsqueeze(-1) * u
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("name", TINY)
def test_cap_equals_a_hook_on_transformers(name):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        GOLDEN / name, dtype=torch.float32
    ).eval()
    m, (ids, mask) = tiny(name), batch(name)
    layers, u = [1, 2], unit(2, 64, seed=3)
    c = medians(hidden_states(m, ids, attention_mask=mask), u, layers, mask)
    ceilings = c.expand(3, 2).clone()
    ceilings[1] = float("inf")  # row 1 is not capped
    ceilings[2, 1] -= 1.0  # row 2 more strictly at index 2
    got = m(ids, attention_mask=mask, cap=[M.Cap(layers, u, ceilings)]) * mask[..., None]
    handles = [cap_hook(hf.model.layers[L - 1], u[j], ceilings[:, j]) for j, L in enumerate(layers)]
    try:
        with torch.no_grad():
            ref = hf(ids, attention_mask=mask).logits * mask[..., None]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    plain = m(ids, attention_mask=mask) * mask[..., None]
    assert (got[[0, 2]] - plain[[0, 2]]).abs().max() > 1e-2 and torch.equal(got[1], plain[1])


def test_per_row_ceilings_equal_each_row_capped_alone():
    m, layers, u = tiny("tiny-qwen2"), [1, 3], unit(2, 64, seed=4)
    ceilings = torch.tensor([[0.0, -1.0], [float("inf")] * 2, [-2.0, 0.5]])
    cap = M.Cap(layers, u, ceilings, "response")
    batched = M.generate(m, PROMPTS, 10, cap=[cap])
    fired = cap.fired.tolist()
    alone = []
    for p, row in zip(PROMPTS, ceilings):
        one = M.Cap(layers, u, row, "response")
        alone.append((M.generate(m, [p], 10, cap=[one])[0], int(one.fired[0])))
    assert list(zip(batched, fired)) == alone
    assert batched[1] == M.generate(m, [PROMPTS[1]], 10)[0] and fired[1] == 0
    assert batched != M.generate(m, PROMPTS, 10) and fired[0] > 0 and fired[2] > 0
    # the logits too: a left-padded batched forward equals each row's own, on its real tokens
    ids, mask = batch("tiny-qwen2")
    start = torch.tensor([14, 20, 15])
    got = m(
        ids, attention_mask=mask, answer_start=start, cap=[M.Cap(layers, u, ceilings, "response")]
    )
    for b in range(3):
        real = mask[b].bool()
        one = m(
            ids[b : b + 1, real],
            answer_start=start[b : b + 1] - int((~real).sum()),
            cap=[M.Cap(layers, u, ceilings[b], "response")],
        )
        torch.testing.assert_close(got[b, real], one[0], rtol=1e-4, atol=1e-4)


def test_fired_counts_the_capped_response_positions_of_a_sequence():
    m = tiny("tiny-llama3")
    # below every projection: fires everywhere
    low = M.Cap([1, 2], unit(2, 64, seed=5), [-3.0, -3.0], "all")
    free = M.generate(m, PROMPTS, 8, cap=[low])
    # row 0 stops there
    stop = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
    outs = M.generate(m, PROMPTS, 8, stop_ids={stop}, cap=[low])
    assert outs[0] == free[0][: free[0].index(stop)] and len(outs[0]) < 8
    assert low.fired.tolist() == [
        len(out) + 1 for out in outs
    ]  # the last prompt token and every answer token
    # greedy decoding with the cache equals a capped forward over prompt + answer, which counts the
    # same
    for b, (p, out) in enumerate(zip(PROMPTS, outs)):
        full = M.Cap([1, 2], unit(2, 64, seed=5), [-3.0, -3.0], "all")
        logits = m(torch.tensor([p + out]), answer_start=torch.tensor([len(p)]), cap=[full])[
            0, len(p) - 1 : -1
        ]
        assert logits.argmax(-1).tolist() == out and full.fired.tolist() == [low.fired[b]]
    # the same Cap, a new sequence: a new count, of the new batch
    M.generate(m, PROMPTS[:2], 4, cap=[low])
    assert low.fired.tolist() == [5, 5]
    high = M.Cap([1, 2], unit(2, 64, seed=5), [1e4, 1e4])  # above every projection: never fires
    assert M.generate(m, PROMPTS, 8, cap=[high]) == M.generate(
        m, PROMPTS, 8
    ) and high.fired.tolist() == [0, 0, 0]


def test_cap_comes_after_steering_and_ablation_at_the_same_index():
    m, ids, L = tiny("tiny-llama3"), torch.tensor([[5, 6, 7, 8, 9, 10]]), 2
    u, w = unit(2, 64, seed=6)
    base = hidden_states(m, ids)
    c = float((base[L, 0] @ u).mean())
    steer = [M.Steer(L, u, 50.0)]  # pushes every position far above the ceiling
    got = hidden_states(m, ids, steer=steer, cap=[M.Cap([L], u[None], [c])])
    assert (got[L, 0] @ u).max() <= c + 1e-4
    torch.testing.assert_close(got[L], capped(base[L] + 50.0 * u, u, c), rtol=0, atol=1e-4)
    got = hidden_states(m, ids, ablate=[M.Ablate(L, w)], cap=[M.Cap([L], u[None], [c])])
    ablated = hidden_states(m, ids, ablate=[M.Ablate(L, w)])
    torch.testing.assert_close(got[L], capped(ablated[L], u, c), rtol=0, atol=1e-5)
    assert (got[L, 0] @ u).max() <= c + 1e-5 and (ablated[L, 0] @ u).max() > c + 1e-2


def test_cap_trains_under_gradient_checkpointing():
    m, ids = tiny("tiny-llama3").train(), torch.tensor([[5, 6, 7, 8, 9]])
    u = unit(2, 64, seed=7)

    def grads():
        m.zero_grad()
        cap = M.Cap([1, 2], u, [0.0, 0.0])
        loss = torch.nn.functional.cross_entropy(m(ids, cap=[cap])[0, :-1], ids[0, 1:])
        loss.backward()
        return loss.detach(), m.model.layers[0].mlp.up_proj.weight.grad.clone(), cap.fired

    loss, g, fired = grads()
    m.gradient_checkpointing = True
    loss2, g2, fired2 = grads()
    assert torch.allclose(loss, loss2) and torch.allclose(g, g2, atol=1e-6) and g.abs().sum() > 0
    # no answer_start: the last token is the response
    assert torch.equal(fired, fired2) and fired.item() == 1


def test_cap_is_checked_once_per_sequence_and_kept_on_the_device(monkeypatch):
    m, calls = tiny("tiny-llama3"), []
    check = M.Transformer.start_sequence
    monkeypatch.setattr(M.Transformer, "start_sequence", lambda *a: calls.append(a) or check(*a))
    cap = M.Cap([1], unit(1, 64).double(), [0.0])
    M.generate(m, [[5, 6, 7]], 12, cap=[cap])
    assert len(calls) == 1 and cap.directions.dtype == torch.float32


H = torch.randn(1, 64)
CASES = [  # (Cap arguments, message at the first forward call)
    (([4], H, [0.0]), r"layer out of range in \[4\]: hidden indices are 0\.\.3"),
    (([1, -1], torch.randn(2, 64), [0.0, 0.0]), r"layer out of range in \[1, -1\]"),
    (([1], H, [0.0], "middle"), "positions must be all, prompt or response"),
]


@pytest.mark.parametrize("args, message", CASES)
def test_bad_caps_are_one_line_user_errors(args, message):
    """What would cap nothing silently is refused at the first call (the values, finite and
    nonzero, are the callers' to check: support/capping.py)."""
    m = tiny("tiny-llama3")
    with pytest.raises(UserError, match=message) as e:
        m(torch.tensor([[5, 6, 7]]), cap=[M.Cap(*args)])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "args",
    [
        ([1, 2], H, [0.0, 0.0]),
        ([1], torch.randn(64), [0.0]),
        ([1], H, [0.0, 1.0]),
        ([1], H, torch.zeros(2, 2, 1)),
    ],
)
def test_a_cap_has_a_direction_and_a_ceiling_per_layer(args):
    with pytest.raises(AssertionError, match="one of each per layer"):
        M.Cap(*args)
    m = tiny("tiny-llama3")
    with pytest.raises(RuntimeError):  # a direction of another size
        m(torch.tensor([[5, 6, 7]]), cap=[M.Cap([1], torch.randn(1, 32), [0.0])])
