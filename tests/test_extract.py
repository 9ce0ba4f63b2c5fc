"""The extraction pipeline end to end on a tiny random chat model (and, slow, on the default
model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import FakeJudge, make_tiny_chat_model

import model as M
import persona_vectors as pv
from apps import control_vector
from support import checkpoint

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


def run_extract(tiny_dir, out, **kw):
    args = (
        dict(
            model=str(tiny_dir),
            judge="none",
            rollouts=1,
            max_new_tokens=6,
            questions=2,
            out=str(out),
            batch_size=7,
            seed=3,
            device="cpu",
        )
        | kw
    )
    return pv.extract("evil", **args)


def test_extract_end_to_end_and_vector_equals_hand_computed_mean_difference(
    tiny_dir, tmp_path, capsys
):
    paths = run_extract(tiny_dir, tmp_path)
    err = capsys.readouterr().err
    assert "judge: NONE" in err and "kept 10/10 pairs" in err
    vec, meta = pv.load_vector(paths["response_avg"])
    assert (
        vec.shape == (4, 64)
        and meta["judge"] == "none"
        and meta["kept_pairs"] == 10
        and meta["total_pairs"] == 10
    )
    assert (
        meta["variant"] == "response_avg"
        and len(meta["residual_norm"]) == 4
        and "index 0" in meta["layer_convention"]
    )
    assert meta["model_source"]["origin"] == "local" and meta["model_source"]["path"] == str(
        tiny_dir
    )
    # the gauge's reference marks: pos and neg means projected on the unit vector, `pos - neg` being
    # |v| itself
    gap = torch.tensor(meta["pos_response_avg_projection"]) - torch.tensor(
        meta["neg_response_avg_projection"]
    )
    assert (
        torch.allclose(gap, vec.norm(dim=-1), atol=1e-3)
        and len(meta["pos_prompt_last_projection"]) == 4
    )
    # recompute every kept answer's activations with a plain forward pass over prompt + generated
    # tokens
    model, tok = checkpoint.load(str(tiny_dir), "cpu", torch.float32)
    rows = []
    work = next((tmp_path / ".work").glob("evil-*"))
    from safetensors import safe_open

    for f in sorted(work.glob("batch-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            rows += json.loads(h.metadata()["rows"])
    means = {}
    for side in ("pos", "neg"):
        caps = []
        for r in (r for r in rows if r["side"] == side):
            p = tok.encode_chat(
                [
                    {"role": "system", "content": r["system"]},
                    {"role": "user", "content": r["question"]},
                ]
            )
            cap = M.Capture()
            with torch.no_grad():
                model(
                    torch.tensor([p + r["answer_ids"]]),
                    answer_start=torch.tensor([len(p)]),
                    capture=cap,
                    logits="none",
                )
            caps.append(cap)
        means[side] = {
            v: torch.cat(
                [
                    getattr(
                        c,
                        {
                            "response_avg": "answer_mean",
                            "prompt_avg": "prompt_mean",
                            "prompt_last": "prompt_last",
                        }[v],
                    )()
                    for c in caps
                ]
            ).mean(0)
            for v in pv.VARIANTS
        }
    for variant in pv.VARIANTS:
        got, _ = pv.load_vector(paths[variant])
        assert torch.allclose(got, means["pos"][variant] - means["neg"][variant], atol=1e-4), (
            variant
        )
    # the rollouts as CSV, official columns first
    header = paths["csv_pos"].read_text().splitlines()[0]
    assert header.startswith("question,prompt,answer,question_id,evil,coherence")


def test_kill_and_resume_gives_the_same_vector_without_regenerating(tiny_dir, tmp_path):
    ref = run_extract(tiny_dir, tmp_path / "ref", batch_size=4)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "persona_vectors.py"),
        "extract",
        "evil",
        "--model",
        str(tiny_dir),
        "--judge",
        "none",
        "--rollouts",
        "1",
        "--max-new-tokens",
        "6",
        "--questions",
        "2",
        "--batch-size",
        "4",
        "--seed",
        "3",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # kill -9 as soon as the first batch is on disk
        if line.startswith("rollouts: 4/20"):
            proc.kill()
            break
    proc.wait()
    work = next((out / ".work").glob("evil-*"))
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("batch-*.safetensors")}
    assert 1 <= len(before) < 5 and not list(out.glob("*.safetensors"))
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"rollouts: {4 * len(before)} of 20 loaded" in r.stderr
    # not regenerated
    assert all(work.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    for variant in pv.VARIANTS:
        assert torch.equal(
            pv.load_vector(out / f"evil_{variant}_diff.safetensors")[0],
            pv.load_vector(ref[variant])[0],
        )


def test_keep_pairs_thresholds():
    rows = []
    for i, (p, n, cp, cn) in enumerate(
        [(80, 10, 90, 90), (40, 10, 90, 90), (80, 60, 90, 90), (80, 10, 30, 90), (None, 10, 90, 90)]
    ):
        rows += [
            dict(key=f"pos:0:{i}:0", side="pos", evil=p, coherence=cp),
            dict(key=f"neg:0:{i}:0", side="neg", evil=n, coherence=cn),
        ]
    pos, neg, why = pv.keep_pairs(rows, "evil", True, 50, 50, 50)
    assert pos == [0] and neg == [1]
    assert why == {"pos trait score": 2, "neg trait score": 1, "coherence": 1, "empty answer": 0}
    assert pv.keep_pairs(rows, "evil", True, 30, 70, 20)[0] == [0, 2, 4, 6]
    assert pv.keep_pairs(rows, "evil", False, 50, 50, 50)[0] == [
        0,
        2,
        4,
        6,
        8,
    ]  # no judge: keep everything
    # an empty answer has no mean activation: its pair never enters the means, judged or not
    rows[2]["n_tokens"] = 0
    assert pv.keep_pairs(rows, "evil", True, 30, 70, 20)[0] == [0, 4, 6]
    pos, neg, why = pv.keep_pairs(rows, "evil", False, 50, 50, 50)
    assert pos == [0, 4, 6, 8] and why["empty answer"] == 1


def test_no_surviving_pair_names_the_threshold(tiny_dir, tmp_path, monkeypatch):
    import judge as J

    harsh = FakeJudge("fake:harsh", 10.0)  # nothing is evil enough, and everything is incoherent
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: harsh)
    with pytest.raises(ValueError, match="no pair of 10 survived.*relax --"):
        run_extract(tiny_dir, tmp_path, judge="fake")


def test_a_judge_without_numbers_is_a_clear_error(tiny_dir, tmp_path, monkeypatch):
    import judge as J

    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: FakeJudge("fake:mute", None))
    with pytest.raises(ValueError, match="gave no score to any of 20 answers"):
        run_extract(tiny_dir, tmp_path, judge="fake")


def test_judge_results_are_cached_and_recorded(tiny_dir, tmp_path, monkeypatch):
    import judge as J

    fake = FakeJudge("fake:scores", 80.0)
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: fake)
    paths = run_extract(tiny_dir, tmp_path, judge="fake", pos_threshold=0, neg_threshold=101)
    first = fake.asked  # 20 answers x (trait + coherence), identical prompts asked once
    assert pv.load_vector(paths["response_avg"])[1]["judge"] == "fake:scores" and 0 < first <= 40
    run_extract(tiny_dir, tmp_path, judge="fake", pos_threshold=0, neg_threshold=101)
    assert fake.asked == first  # the rerun paid for no judgment


def test_bad_input(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="evil"):
        pv.extract("no_such_trait", model=str(tiny_dir), judge="none")
    with pytest.raises(ValueError):
        pv.extract("../evil", model=str(tiny_dir), judge="none")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setattr(
        checkpoint,
        "load",
        lambda *a, **k: pytest.fail("generation started before the judge was checked"),
    )
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        pv.extract("evil", model=str(tiny_dir), judge="openai")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="choose another --out"):
        run_extract(tiny_dir, blocker / "sub")


def test_import_vector(tmp_path):
    # a named model's config is read: its shape is checked
    d = make_tiny_chat_model(tmp_path / "tiny")
    vec = torch.randn(4, 64)
    src = tmp_path / "evil_response_avg_diff.pt"
    torch.save(vec, src)
    dest = control_vector.import_vector(str(src), str(tmp_path / "out"), str(d))
    got, meta = pv.load_vector(dest)
    assert torch.equal(got, vec) and meta["trait"] == "evil" and meta["variant"] == "response_avg"
    assert meta["model"] == str(d)
    torch.save({"not": "a tensor"}, tmp_path / "x_prompt_last_diff.pt")
    with pytest.raises(ValueError, match="expected one"):
        control_vector.import_vector(str(tmp_path / "x_prompt_last_diff.pt"))
    torch.save(NotATensor(), tmp_path / "y.pt")  # weights_only loading refuses anything but tensors
    with pytest.raises(pv.UserError, match="holds more than tensors") as e:
        control_vector.import_vector(str(tmp_path / "y.pt"))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


def test_import_vector_lands_where_steering_looks_and_keeps_its_limits(tmp_path, monkeypatch):
    """--model M writes vectors/<M>/ (where --steer TRAIT:COEF looks), never overwrites silently,
    refuses relative coefficients (no residual norms) and never steers with the post-norm last
    row."""
    monkeypatch.chdir(tmp_path)
    d = make_tiny_chat_model(tmp_path / "tiny")
    model, _ = checkpoint.load(str(d), "cpu", torch.float32)
    src = tmp_path / "evil_response_avg_diff.pt"
    torch.save(torch.randn(4, 64), src)
    dest = control_vector.import_vector(str(src), model=str(d))
    assert dest == Path("vectors") / "tiny" / "evil_response_avg_diff.safetensors"
    model.name_or_path = str(d)
    (s,) = pv.steering(["evil:2"], model, layer=2)  # found by trait name in the default directory
    assert s.layer == 2 and torch.equal(s.vector, pv.load_vector(dest)[0][2])
    with pytest.raises(pv.UserError, match="--force"):
        control_vector.import_vector(str(src), model=str(d))
    assert control_vector.import_vector(str(src), model=str(d), force=True) == dest
    with pytest.raises(pv.UserError, match="relative coefficient has no unit"):
        pv.steering(["evil:0.1r"], model, layer=2)
    with pytest.raises(pv.UserError, match="after the final norm"):
        pv.steering(["evil:1"], model, layer=3)
    steers = pv.steering(["evil:1"], model, layer=2, all_layers=True)
    assert [s.layer for s in steers] == [1, 2]  # block 3 would need the post-norm row


class NotATensor:
    pass


@pytest.mark.slow
def test_extract_on_the_default_model_with_a_tiny_budget(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "persona_vectors.py"),
            "extract",
            "evil",
            "--judge",
            "none",
            "--questions",
            "1",
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    vec, meta = pv.load_vector(tmp_path / "evil_response_avg_diff.safetensors")
    assert vec.shape == (31, 576) and meta["kept_pairs"] == 5 and meta["judge"] == "none"
    # made offline from the wheel's 4-bit GGUF: the metadata says so, beside the hub id
    assert (
        meta["model_source"]["origin"] == "gguf-wheel"
        and "Q4_1" in meta["model_source"]["quantization"]
    )
    assert torch.isfinite(vec).all() and vec[1:].norm(dim=-1).min() > 0
