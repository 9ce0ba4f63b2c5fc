"""eval and sweep on a tiny random chat model, with a stand-in judge."""

import csv
import doctest
import json

import pytest
import torch
from tiny import FakeJudge, tiny_model_with_vectors

import model as M
import persona_vectors as pv
from support import checkpoint
from support.traits import load_trait


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_with_vectors(tmp_path_factory.mktemp("tiny"))


def test_doctests():
    for module in (pv, M):
        assert doctest.testmod(module).failed == 0


def test_best_setting_respects_the_coherence_guard():
    rows = [
        dict(layer=5, coef=2.5, trait_mean=90.0, coherence_mean=40.0),
        dict(layer=10, coef=1.0, trait_mean=70.0, coherence_mean=80.0),
        dict(layer=15, coef=1.5, trait_mean=75.0, coherence_mean=76.0),
        dict(layer=20, coef=0.5, trait_mean=None, coherence_mean=None),
    ]
    assert pv.best_setting(rows)["layer"] == 15
    assert pv.best_setting(rows, coherence_min=78)["layer"] == 10
    assert pv.best_setting(rows, coherence_min=95) is None


def test_eval_uses_only_evaluation_questions(tiny, tmp_path, monkeypatch):
    import judge as J

    d, vectors = tiny
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: FakeJudge(hashed=True))
    r = pv.evaluate(
        "evil",
        str(d),
        judge="fake",
        samples=2,
        questions=3,
        vectors=str(vectors),
        out=str(tmp_path),
        max_new_tokens=5,
        device="cpu",
    )
    rows = list(csv.DictReader(open(r["csv"])))
    t = load_trait("evil")
    assert len(rows) == 6 and {row["question"] for row in rows} == set(t.eval_questions[:3])
    assert not {row["question"] for row in rows} & set(t.extract_questions)
    assert r["n"] == r["judged"] == 6 and r["trait_mean"] == pytest.approx(
        sum(float(x["evil"]) for x in rows) / 6
    )
    assert r["projection_mean"] is not None and r["projection_layer"] == 1  # the middle of 3 blocks


def reread_projection(model, tok, question, answer_ids, v, layer):
    """The answer as the plain (unsteered) model reads it: one forward pass over prompt + answer,
    projected."""
    prompt = tok.encode_chat([{"role": "user", "content": question}])
    cap = M.Capture()
    with torch.no_grad():
        model(
            torch.tensor([prompt + answer_ids]),
            answer_start=torch.tensor([len(prompt)]),
            capture=cap,
            logits="none",
        )
    return float(cap.answer_mean()[0, layer] @ (v / v.norm()))


def test_steered_answers_are_measured_as_the_unsteered_model_reads_them(tiny, tmp_path):
    d, vectors = tiny
    kw = dict(
        model=str(d),
        judge="none",
        questions=4,
        vectors=str(vectors),
        out=str(tmp_path),
        max_new_tokens=6,
        device="cpu",
    )
    base = pv.evaluate("evil", **kw)
    zero = pv.evaluate("evil", steer=["evil:0"], **kw)
    assert base["trait_mean"] is None and base["judge"] == "none"
    assert zero["projection_mean"] == base["projection_mean"]  # exactly: coef 0 is no steering
    assert [r["projection"] for r in csv.DictReader(open(zero["csv"]))] == [
        r["projection"] for r in csv.DictReader(open(base["csv"]))
    ]
    for spec, layer, all_layers in (
        (["evil:20"], 2, False),
        (["evil:20", "humorous:-10"], 2, False),
        (["evil:5"], None, True),
    ):
        steered = pv.evaluate("evil", steer=spec, layer=layer, all_layers=all_layers, **kw)
        model, tok = checkpoint.load(str(d), "cpu", torch.float32)
        L = steered["projection_layer"]
        v = pv.load_vector(vectors / "evil_response_avg_diff.safetensors")[0][L]
        rows = list(csv.DictReader(open(steered["csv"])))
        # the answers again, by hand (greedy: one sample per question), then each re-read without
        # steering
        interventions = pv.steering(spec, model, vectors, layer, "response", all_layers)
        outs = M.generate(
            model,
            [tok.encode_chat([{"role": "user", "content": r["question"]}]) for r in rows],
            6,
            stop_ids=tok.stop_ids,
            pad_id=tok.pad_id,
            steer=interventions,
        )
        for row, ids in zip(rows, outs):
            assert tok.decode(ids) == row["answer"]
            assert float(row["projection"]) == pytest.approx(
                reread_projection(model, tok, row["question"], ids, v, L), abs=1e-4
            )
        # what capturing while steering would report instead: shifted by about coef * |v| (the bug
        # this prevents)
        assert steered["projection_mean"] is not None


def test_sweep_end_to_end_writes_its_own_result_and_resumes(tiny, tmp_path, monkeypatch):
    """The sweep's best setting goes to TRAIT_sweep.json; the vector file is not changed (not a
    byte), and a later command steers at the sweep's layer only when told (--layer sweep)."""
    import judge as J

    d, vectors = tiny
    judge = FakeJudge(hashed=True)
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: judge)
    vec_dir = tmp_path / "vectors"
    vec_dir.mkdir()
    vec_file = vec_dir / "evil_response_avg_diff.safetensors"
    vec_file.write_bytes((vectors / "evil_response_avg_diff.safetensors").read_bytes())
    before = vec_file.read_bytes()
    kw = dict(
        model=str(d),
        judge="fake",
        layers=[2, 3],
        coefs=[0.5, 4.0],
        questions=2,
        vectors=str(vec_dir),
        max_new_tokens=5,
        coherence_min=0,
        device="cpu",
    )
    result = pv.sweep("evil", **kw)
    rows = list(csv.DictReader(open(result["csv"])))
    grid = [(int(r["layer"]), float(r["coef"])) for r in rows]
    assert grid == [(2, 0.5), (2, 4.0), (3, 0.5), (3, 4.0)]
    try:  # the plot is optional: a PNG when matplotlib is installed
        import matplotlib  # noqa: F401

        assert result["plot"].read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        assert result["plot"] is None
    best = pv.best_setting(result["results"], 0)
    assert vec_file.read_bytes() == before  # vectors are immutable
    recorded = json.loads((vec_dir / "evil_sweep.json").read_text())
    assert recorded["best_layer"] == best["layer"] and recorded["best_coef"] == str(best["coef"])
    model = checkpoint.load(str(d), "cpu")[0]
    assert pv.steering(["evil:1"], model, vec_dir)[0].layer == 1  # the middle, as before the sweep
    told = pv.steering(["evil:1"], model, vec_dir, layer="sweep")[0].layer
    assert told == best["layer"] != 1
    asked, calls = judge.asked, []
    monkeypatch.setattr(M, "generate", lambda *a, **k: calls.append(1))
    pv.sweep("evil", **kw)  # everything cached: no generation, no judgment
    assert calls == [] and judge.asked == asked
