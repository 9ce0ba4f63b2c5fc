"""Persona capping's calibration (apps/capping.py), its ceiling file and --cap specs (support/capping.py), and the
study's code path (tools/cap_study.py), on a tiny random model."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import model as M
import persona_vectors as pv
from support import UserError
from support import generation as G
from support.capping import PERCENTILES, caps_for, caps_per_row, ceiling_path, parse_cap
from support.files import load_vector
from tiny import run_bad, tiny_model_with_vectors, tree

QUESTIONS = ["What is the capital of France?", "Give me a number.", "How are you?", "Help me, please.",
             "What is 42?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its vectors, evil calibrated; `other` calibrated on another model, `stale` for another
    vector; humorous not calibrated."""
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("cap"))
    root = d.parent
    (root / "q.json").write_text(json.dumps(QUESTIONS))
    assert pv.main(["calibrate-cap", "evil", "--model", str(d), "--vectors", str(vectors), "--questions-file",
                    str(root / "q.json"), "--n", "4", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    evil = vectors / "evil_response_avg_diff.safetensors"
    ceilings = json.loads(ceiling_path(evil).read_text())
    shutil.copy(evil, vectors / "other_response_avg_diff.safetensors")
    (vectors / "other_response_avg_diff.cap.json").write_text(json.dumps(
        ceilings | dict(model="someone/else", model_path="/nowhere")))
    shutil.copy(vectors / "humorous_response_avg_diff.safetensors", vectors / "stale_response_avg_diff.safetensors")
    shutil.copy(ceiling_path(evil), vectors / "stale_response_avg_diff.cap.json")
    return d, vectors, root


@pytest.fixture(scope="module")
def loaded(tiny):
    return M.load(str(tiny[0]), "cpu", torch.float32)


def hidden_states(model, ids: list[int]) -> torch.Tensor:
    """The states at every hidden index for one unpadded sequence, the blocks run by hand -> [N + 1, T, hidden]."""
    x = torch.tensor([ids])
    cos, sin = model.model.rotary_emb(torch.arange(len(ids))[None], torch.float32)
    h, out = model.model.embed_tokens(x), []
    out.append(h)
    for block in model.model.layers:
        h = block(h, cos, sin, None)
        out.append(h)
    return torch.cat(out)


def test_calibrate_cap_writes_the_percentiles_of_every_answer_token(tiny, loaded):
    d, vectors, root = tiny
    model, tok = loaded
    c = json.loads((vectors / "evil_response_avg_diff.cap.json").read_text())
    table = np.array(c["ceilings"])  # [percentile, N + 1]
    assert c["percentiles"] == PERCENTILES and table.shape == (len(PERCENTILES), 4)
    assert (np.diff(table, axis=0) >= 0).all()  # monotone in the percentile at every layer
    assert c["model"] == str(d) and c["answers"] == 4 and c["questions_sha256"]
    units = pv.unit(load_vector(vectors / "evil_response_avg_diff.safetensors")[0])
    proj = []
    with torch.no_grad():
        for q in QUESTIONS[:4]:  # each answered alone, read back by hand: no padding, no Capture
            prompt = tok.encode_chat([{"role": "user", "content": q}])
            answer = G.generate(model, [prompt], 6, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
            h = hidden_states(model, prompt + answer)[:, len(prompt):]  # [N + 1, answer, hidden]
            proj.append((h * units[:, None]).sum(-1).T.numpy())  # [answer, N + 1]
    proj = np.concatenate(proj)
    assert c["tokens"] == len(proj)
    np.testing.assert_allclose(table, np.percentile(proj, PERCENTILES, axis=0), atol=2e-3)


def test_calibrate_cap_refuses_to_overwrite_without_force(tiny, capsys):
    d, vectors, root = tiny
    before = tree(root)
    err = run_bad(pv.main, ["calibrate-cap", "evil", "--model", str(d), "--vectors", str(vectors)], 1, capsys)
    assert "pass --force" in err[-1] and tree(root) == before


def cap_main(argv: list[str]) -> int:
    """What `--cap SPEC` does on the command line once the model is loaded, with main's error handling."""
    model, vectors = cap_main.loaded, cap_main.vectors
    try:
        caps_for(argv, model, vectors)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def no_generation(*args, **kwargs):
    raise AssertionError("generation started before the input was checked")


# (arguments, exit code, what the message must say); {d} = tiny model, {v} = its vectors, {r} = the test folder.
# "cap SPEC" runs SPEC through caps_for (the --cap of generate, chat, eval, serve); the rest through pv.main.
CASES = [
    ("cap evil:150", 1, "the percentile must be a number in (0, 100)"),
    ("cap evil:0", 1, "the percentile must be a number in (0, 100)"),
    ("cap evil:x", 1, "the percentile must be a number in (0, 100)"),
    ("cap evil:99.95", 1, "outside the calibrated 1..99.9"),
    ("cap evil@9", 1, "layer 9 out of range: this model has blocks 1..3"),
    ("cap evil@0-2", 1, "layer 0 out of range"),
    ("cap evil@2-x", 1, "layers must be like 16, 16-19 or 12,14,16"),
    ("cap :90", 1, "expected TRAIT[:PERCENTILE][@LAYERS]"),
    ("cap nosuch", 1, "run `extract nosuch` first"),
    ("cap {r}/missing.safetensors", 1, "does not exist"),
    ("cap humorous", 1, "run: python persona_vectors.py calibrate-cap humorous"),
    ("cap other", 1, "was calibrated on someone/else, not"),
    ("cap stale", 1, "calibrated for another stale vector (sha256 differs)"),
    ("calibrate-cap nosuch --model {d} --vectors {v}", 1, "run `extract nosuch` first"),
    ("calibrate-cap evil --model {d} --vectors {v}", 1, "exists: pass --force"),
    ("calibrate-cap humorous --model {d} --vectors {v} --n 0", 2, "--n: must be >= 1"),
    ("calibrate-cap humorous --model {d} --vectors {v} --questions-file {r}/missing.json", 1, "no questions file"),
    ("calibrate-cap humorous --model {d} --vectors {v} --questions-file {v}/evil_response_avg_diff.cap.json", 1,
     "expected a list of strings"),
    ("calibrate-cap humorous --model {d} --vectors {v} --device cuda:7", 1, "cuda"),
    ("calibrate-cap {r}/wide.safetensors --model {d}", 1, "use a vector extracted from this model"),
]


@pytest.mark.parametrize("argv, code, message", CASES, ids=[c[0].split(" {")[0] + " " + c[2][:30] for c in CASES])
def test_bad_input(tiny, loaded, argv, code, message, monkeypatch, capsys, tmp_path):
    from tiny import write_vector
    d, vectors, root = tiny
    if not (root / "wide.safetensors").exists():
        write_vector(root / "wide.safetensors", torch.randn(4, 96))
    cap_main.loaded, cap_main.vectors = loaded[0], vectors
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(G, "generate", no_generation)
    before = tree(root)
    args = argv.format(d=d, v=vectors, r=root).split()
    err = run_bad(cap_main, args[1:], code, capsys) if args[0] == "cap" else run_bad(pv.main, args, code, capsys)
    assert message in err[-1], err
    assert err[-1].startswith("error: " if code == 1 else "persona_vectors.py")
    assert list(tmp_path.iterdir()) == []
    assert tree(root) == before


def test_a_percentile_between_grid_points_is_interpolated(tiny, loaded, capsys):
    d, vectors, root = tiny
    table = np.array(json.loads((vectors / "evil_response_avg_diff.cap.json").read_text())["ceilings"])
    cap, = caps_for(["evil:90.25@1,3"], loaded[0], vectors)
    assert cap.layers == [1, 3]
    want = table[89, [1, 3]] + 0.25 * (table[90, [1, 3]] - table[89, [1, 3]])  # grid index 89 is percentile 90
    np.testing.assert_allclose(cap.ceilings.numpy(), want, rtol=1e-5)
    assert "interpolating linearly" in capsys.readouterr().err
    default, = caps_for(["evil"], loaded[0], vectors)
    assert default.layers == [2] and parse_cap("evil").percentile == 90  # the band 0.53 N .. 0.63 N of 3 blocks


def test_caps_per_row_leave_rows_without_a_cap_unchanged(tiny, loaded):
    d, vectors, root = tiny
    model, tok = loaded
    caps = caps_per_row([["evil:50@2"], [], ["evil:99@2", "evil:10@1,3"]], model, vectors)
    assert [c.layers for c in caps] == [[2], [1, 3]]  # one Cap per (vector, layers)
    cap, inf = caps[0], float("inf")
    assert cap.ceilings.shape == (3, 1) and cap.ceilings[1, 0] == inf and cap.ceilings[0, 0] < cap.ceilings[2, 0]
    assert caps[1].ceilings[:2].eq(inf).all() and caps[1].ceilings[2].isfinite().all()
    prompt = tok.encode_chat([{"role": "user", "content": "How are you?"}])
    plain = G.generate(model, [prompt] * 3, 5, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    capped = G.generate(model, [prompt] * 3, 5, stop_ids=tok.stop_ids, pad_id=tok.pad_id, cap=caps)
    assert capped[1] == plain[1] and cap.fired[1] == 0 and caps[1].fired[1] == 0


def test_study_runs_and_resumes(tiny, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import cap_study
    d, vectors, root = tiny
    kw = dict(questions=2, benign=1, max_new_tokens=4, coefs=[1, 4], percentiles=[50, 99], bands=["2", "1-2"],
              batch_size=8, figure=str(tmp_path / "capping.json"), device="cpu")
    doc = cap_study.study(str(d), "evil", str(vectors), str(tmp_path / "study"), **kw)
    assert [r["name"] for r in doc["rows"]] == ["none", "steer-1", "steer-4", "cap-50@2", "cap-99@2", "cap-50@1-2",
                                                "cap-99@1-2"]
    none = doc["rows"][0]
    assert none["reduction"] == 0 and none["unchanged"] == 1 and none["nll_increase"] == 0
    assert len(none["expression_by_grade"]) == 5 and (tmp_path / "capping.png").stat().st_size < 150_000
    monkeypatch.setattr(G, "generate", no_generation)  # every arm is cached now
    assert cap_study.study(str(d), "evil", str(vectors), str(tmp_path / "study"), **kw)["rows"] == doc["rows"]
