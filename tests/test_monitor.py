"""Monitoring: projection math, the random-direction null, the experiment's bookkeeping, and
`monitor` on files."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import FakeJudge, tiny_model_with_vectors

import model as M
import persona_vectors as pv
from apps import monitor
from support import checkpoint, stats


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_with_vectors(tmp_path_factory.mktemp("tiny"))


def test_projection_math_by_hand():
    assert stats.pearson(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])
    ) == pytest.approx(1.0)
    assert stats.pearson(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    ) == pytest.approx(-1.0)
    x, y = (
        torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0]),
        torch.tensor([1.0, 2.0, 3.0, 3.0, 2.0, 1.0]),
    )
    assert stats.within_r(x, y, ["a"] * 3 + ["b"] * 3) == pytest.approx(0.0)  # +1 and -1
    d = stats.random_directions(100, 7.5, 64, seed=1)
    assert d.shape == (100, 64) and torch.allclose(d.norm(dim=-1), torch.full((100,), 7.5))
    lo, hi = stats.bootstrap_ci(lambda s: float(x[s].mean()), 6)
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    assert monitor.token_strip(["a", "b"], [0.0, 2.0], center=1.0, scale=1.0) == "a-3 b+3"


def test_monitor_experiment_bookkeeping(tiny, tmp_path, monkeypatch):
    import judge as J

    d, vectors = tiny
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: FakeJudge(hashed=True))
    r = pv.monitor_experiment(
        "evil",
        "system",
        str(d),
        judge="fake",
        rollouts=1,
        questions=3,
        layer=2,
        vectors=str(vectors),
        out=str(tmp_path),
        max_new_tokens=4,
        random=20,
        device="cpu",
    )
    rows = list(csv.DictReader(open(r["csv"])))
    assert len(rows) == 8 * 3 and [row["condition"] for row in rows[::3]] == [
        f"sys{i}" for i in range(8)
    ]
    assert r["layer"] == 2 and r["n"] == 24 and set(r["cross_trait_r"]) == {"humorous"}
    assert -1 <= r["r"] <= 1 and r["r_ci"][0] <= r["r_ci"][1] and 0 <= r["random_abs_r_95"] <= 1
    try:  # the scatter plot is optional: a PNG when matplotlib is installed
        import matplotlib  # noqa: F401

        assert r["plot"].read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        assert r["plot"] is None
    # a row's projection is the last prompt token's state at layer 2 on the unit vector
    from support.traits import load_trait

    t = load_trait("evil")
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    ids = tok.encode_chat(
        [
            {"role": "system", "content": t.graded_system_prompts[5]},
            {"role": "user", "content": t.eval_questions[1]},
        ]
    )
    cap = M.Capture()
    with torch.no_grad():
        model(torch.tensor([ids]), capture=cap, logits="none")
    v = pv.load_vector(vectors / "evil_response_avg_diff.safetensors")[0][2]
    row = next(x for x in rows if x["condition"] == "sys5" and x["question_id"] == "1")
    assert float(row["projection"]) == pytest.approx(
        float(cap.prompt_last()[0, 2] @ (v / v.norm())), abs=1e-4
    )


def test_monitor_experiment_many_shot_and_no_judge(tiny, tmp_path, capsys):
    d, vectors = tiny
    r = pv.monitor_experiment(
        "evil",
        "many-shot",
        str(d),
        judge="none",
        rollouts=1,
        questions=2,
        vectors=str(vectors),
        out=str(tmp_path),
        max_new_tokens=3,
        device="cpu",
    )
    assert list(r["mean_projection"]) == ["k0", "k5", "k10", "k15", "k20"] and "r" not in r
    assert "correlations with the trait score need judged scores" in capsys.readouterr().err
    # the judge-free statistic, recomputed from the CSV: Spearman's rho of condition grade and
    # projection
    rows = list(csv.DictReader(open(r["csv"])))
    grade = torch.tensor([float(row["grade"]) for row in rows])
    proj = torch.tensor([float(row["projection"]) for row in rows])
    assert [row["grade"] for row in rows[::2]] == ["0", "1", "2", "3", "4"]
    assert r["rho_grade"] == pytest.approx(
        stats.pearson(stats.ranks(grade), stats.ranks(proj)), abs=1e-4
    )
    assert 0 < r["rho_grade_p"] <= 1 and 0 <= r["random_abs_rho_95"] <= 1
    # the result file beside the CSV holds what tools/figures.py draws, the random-direction band
    # included
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import figures

    d = figures.collect_monitor(Path(r["csv"]))
    assert d["projection"] == [round(float(x), 4) for x in proj] and d["rho"] == pytest.approx(
        r["rho_grade"]
    )
    assert len(d["band_5"]) == len(d["band_95"]) == 5 and all(
        lo <= hi for lo, hi in zip(d["band_5"], d["band_95"])
    )
    assert d["n_random"] == 100 and d["conditions"] == list(r["mean_projection"])


def test_rank_statistics_by_hand():
    assert stats.spearman(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 10.0, 100.0, 1000.0])
    ) == pytest.approx(1.0)
    assert stats.spearman(
        torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([4.0, 3.0, 2.0, 1.0])
    ) == pytest.approx(-0.8944, abs=1e-4)
    # a perfect ordering of 8 values: only 1 of 8! orders does as well, so p is about 1/1001 with
    # 1000 shuffles
    x = torch.arange(8.0)
    assert stats.permutation_p(stats.spearman, x, x * 2, n=1000) < 0.01
    assert (
        stats.permutation_p(
            stats.spearman, x, torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]), n=1000
        )
        > 0.05
    )


def test_monitor_conversations(tiny, tmp_path):
    d, vectors = tiny
    conv = [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    src = tmp_path / "c.jsonl"
    src.write_text(
        json.dumps({"messages": conv})
        + "\n"
        + json.dumps({"messages": conv[:1]})
        + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "x"}]})
        + "\n"
    )
    out = monitor.monitor(
        str(src), str(d), ["evil"], layer=2, vectors=str(vectors), tokens=True, device="cpu"
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["turn"], r["trait"]) for r in rows] == [(1, "evil"), (2, "evil")]
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    v = pv.load_vector(vectors / "evil_response_avg_diff.safetensors")[0][2]
    u = v / v.norm()
    for row, i in zip(rows, (1, 3)):
        prompt, reply = tok.encode_chat(conv[:i]), tok.encode(conv[i]["content"])
        cap = M.Capture(token_layers=(2,))
        with torch.no_grad():
            model(
                torch.tensor([prompt + reply]),
                answer_start=torch.tensor([len(prompt)]),
                capture=cap,
                logits="none",
            )
        h = cap.tokens[2][0][0]
        assert row["prompt_last"] == pytest.approx(float(h[len(prompt) - 1] @ u), abs=1e-4)
        assert row["response_avg"] == pytest.approx(float(h[len(prompt) :].mean(0) @ u), abs=1e-4)
        assert len(row["tokens"]) == len(reply) and "".join(row["tokens"]) == conv[i]["content"]
        assert row["token_projections"] == pytest.approx((h[len(prompt) :] @ u).tolist(), abs=1e-3)
    csv_out = monitor.monitor(
        str(src), str(d), None, vectors=str(vectors), out=str(tmp_path / "m.csv"), device="cpu"
    )
    assert len(list(csv.DictReader(open(csv_out)))) == 4  # 2 turns x 2 traits


def test_monitor_bad_input(tiny, tmp_path):
    d, vectors = tiny
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no conversation with a usable assistant turn"):
        monitor.monitor(str(empty), str(d), vectors=str(vectors), device="cpu")
    assert not (tmp_path / "empty.monitor.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    with pytest.raises(ValueError, match="1 with not JSON"):
        monitor.monitor(str(bad), str(d), vectors=str(vectors), device="cpu")
    assert not (tmp_path / "bad.monitor.jsonl").exists()
    other = tmp_path / "other"
    other.mkdir()
    save_file(
        {"vector": torch.randn(31, 576)},
        other / "evil_response_avg_diff.safetensors",
        metadata={"model": json.dumps("HuggingFaceTB/SmolLM2-135M-Instruct")},
    )
    with pytest.raises(ValueError, match="extracted from HuggingFaceTB/SmolLM2-135M-Instruct"):
        monitor.monitor(str(bad), str(d), vectors=str(other), device="cpu")


def test_layer_sweep_reads_each_gauge_at_its_own_sweep_or_its_default(tmp_path):
    """chat/monitor --layer sweep: a trait with a sweep result reads at its best layer, one never
    swept at its default layer (not an error for every gauge but the steered trait's)."""
    import hashlib

    d, vectors = tiny_model_with_vectors(tmp_path)
    model, _ = checkpoint.load(str(d), device="cpu")
    evil = vectors / "evil_response_avg_diff.safetensors"
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    (vectors / "evil_sweep.json").write_text(json.dumps(dict(best_layer=2, vector_sha256=sha)))
    layers = {g.trait: g.layer for g in monitor.gauges_for(model, vectors, None, "sweep")}
    default = {g.trait: g.layer for g in monitor.gauges_for(model, vectors, None, None)}
    assert layers == {"evil": 2, "humorous": default["humorous"]} and default["evil"] != 2
