"""Persona capping's calibration (apps/capping.py), its ceiling file and --cap specs
(support/capping.py), and the study's code path (tools/cap_study.py), on a tiny random model."""

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import main_of, run_bad, tiny_model_with_vectors, tree

import model as M
import persona_vectors as pv
from apps import __main__ as apps_cli
from support import UserError, checkpoint
from support.capping import PERCENTILES, caps_for, caps_per_row, ceiling_path, parse_cap
from support.files import load_vector
from support.plots import pyplot

QUESTIONS = [
    "What is the capital of France?",
    "Give me a number.",
    "How are you?",
    "Help me, please.",
    "What is 42?",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its vectors, evil calibrated; `other` calibrated on another model, `stale`
    for another vector; humorous not calibrated."""
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("cap"))
    root = d.parent
    (root / "q.json").write_text(json.dumps(QUESTIONS))
    assert (
        apps_cli.main(
            [
                "calibrate-cap",
                "evil",
                "--model",
                str(d),
                "--vectors",
                str(vectors),
                "--questions-file",
                str(root / "q.json"),
                "--n",
                "4",
                "--max-new-tokens",
                "6",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    evil = vectors / "evil_response_avg_diff.safetensors"
    ceilings = json.loads(ceiling_path(evil).read_text())
    shutil.copy(evil, vectors / "other_response_avg_diff.safetensors")
    (vectors / "other_response_avg_diff.cap.json").write_text(
        json.dumps(ceilings | dict(model="someone/else", model_path="/nowhere"))
    )
    shutil.copy(
        vectors / "humorous_response_avg_diff.safetensors",
        vectors / "stale_response_avg_diff.safetensors",
    )
    shutil.copy(ceiling_path(evil), vectors / "stale_response_avg_diff.cap.json")
    for name, change in BROKEN.items():  # evil's vector, with a ceiling file changed by hand
        shutil.copy(evil, vectors / f"{name}_response_avg_diff.safetensors")
        damaged = json.dumps(change(dict(ceilings)))
        (vectors / f"{name}_response_avg_diff.cap.json").write_text(damaged)
    return d, vectors, root


BROKEN = {  # trait -> how its ceiling file was damaged
    "nosha": lambda c: {k: v for k, v in c.items() if k != "vector_sha256"},
    "nomodel": lambda c: {k: v for k, v in c.items() if k not in ("model", "model_path")},
    "shortgrid": lambda c: c | {"percentiles": c["percentiles"][:-1]},
    "shortrow": lambda c: (
        c | {"ceilings": [r[:-1] if i == 5 else r for i, r in enumerate(c["ceilings"])]}
    ),
    "nullceil": lambda c: c | {"ceilings": [[None] * len(r) for r in c["ceilings"]]},
    "unsorted": lambda c: c | {"percentiles": c["percentiles"][::-1]},
    "listonly": lambda c: ["not", "an", "object"],
}


@pytest.fixture(scope="module")
def loaded(tiny):
    return checkpoint.load(str(tiny[0]), "cpu", torch.float32)


def hidden_states(model, ids: list[int]) -> torch.Tensor:
    """The states at every hidden index for one unpadded sequence, the blocks run by hand ->
    [N + 1, T, hidden]."""
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
            answer = M.generate(model, [prompt], 6, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
            h = hidden_states(model, prompt + answer)[:, len(prompt) :]  # [N + 1, answer, hidden]
            proj.append((h * units[:, None]).sum(-1).T.numpy())  # [answer, N + 1]
    proj = np.concatenate(proj)
    assert c["tokens"] == len(proj)
    np.testing.assert_allclose(table, np.percentile(proj, PERCENTILES, axis=0), atol=2e-3)


def test_calibrate_cap_refuses_to_overwrite_without_force(tiny, capsys):
    d, vectors, root = tiny
    before = tree(root)
    args = ["calibrate-cap", "evil", "--model", str(d), "--vectors", str(vectors)]
    err = run_bad(apps_cli.main, args, 1, capsys)
    assert "pass --force" in err[-1] and tree(root) == before


def no_generation(*args, **kwargs):
    raise AssertionError("generation started before the input was checked")


# (arguments, exit code, what the message must say); {d} = tiny model, {v} = its vectors, {r} = the
# test folder. "cap SPEC" is `generate Hi --cap SPEC` on the tiny model; every case runs through its
# command line's main (persona_vectors.py, or python -m apps).
GEN = "generate Hi --model {d} --vectors {v} --device cpu --cap"
PIPE = "--model {d} --vectors {v} --judge none --questions 1 --max-new-tokens 2 --device cpu --cap"
CASES = [
    ("cap evil:150", 1, "--cap 'evil:150': the percentile must be a number in (0, 100)"),
    ("cap evil:0", 1, "the percentile must be a number in (0, 100)"),
    ("cap evil:x", 1, "the percentile must be a number in (0, 100)"),
    ("cap evil:99.95", 1, "outside the calibrated 1..99.9"),
    ("cap evil@9", 1, "layer 9 out of range: this model has blocks 1..3"),
    ("cap evil@0-2", 1, "layer 0 out of range"),
    ("cap evil@2-x", 1, "layers must be like 16, 16-19 or 12,14,16"),
    ("cap :90", 1, "expected TRAIT[:PERCENTILE][@LAYERS]"),
    ("cap nosuch", 1, "run `extract nosuch` first"),
    ("cap {r}/missing.safetensors", 1, "does not exist"),
    ("cap humorous", 1, "run: python -m apps calibrate-cap humorous"),
    ("cap other", 1, "was calibrated on someone/else, not"),
    ("cap stale", 1, "calibrated for another stale vector (sha256 differs)"),
    (
        "cap evil:50 --cap humorous",
        1,
        "calibrate-cap humorous",
    ),  # every spec checked before any generation
    # layers checked before any range is expanded; a reversed range is an error, not left out
    ("cap evil@1-5000000", 1, "--cap 'evil@1-5000000': layer 5000000 out of range"),
    ("cap evil@1,3-1", 1, "layers must be like 16, 16-19 or 12,14,16"),
    (
        "cap nosha",
        1,
        "nosha_response_avg_diff.cap.json: no `vector_sha256` (a string); "
        "recalibrate: python -m apps calibrate-cap nosha --force",
    ),
    ("cap nomodel", 1, "nomodel_response_avg_diff.cap.json: no `model`"),
    ("cap shortgrid", 1, "shortgrid_response_avg_diff.cap.json: `ceilings` must be 100 rows"),
    ("cap shortrow", 1, "`ceilings` must be 101 rows (one per percentile) of as many finite"),
    ("cap nullceil", 1, "`ceilings` must be 101 rows"),
    ("cap unsorted", 1, "`percentiles` must be at least two increasing numbers in (0, 100)"),
    (
        "cap listonly",
        1,
        "not a ceiling file of calibrate-cap; recalibrate: "
        "python -m apps calibrate-cap listonly --force",
    ),
    ("chat --model {d} --vectors {v} --device cpu --cap nosha", 1, "no `vector_sha256`"),
    ("eval evil " + PIPE + " shortgrid", 1, "`ceilings` must be 100 rows"),
    ("cap evil --steer nosuch:1", 1, "run `extract nosuch` first"),
    ("generate Hi --model {d} --vectors {v} --device cpu --cap", 2, "--cap: expected one argument"),
    ("chat --model {d} --vectors {v} --device cpu --cap humorous", 1, "calibrate-cap humorous"),
    ("eval evil " + PIPE + " evil@9", 1, "layer 9 out of range"),
    ("eval evil " + PIPE + " other", 1, "was calibrated on someone/else"),
    (
        "sweep evil --layers 1 --coefs 1 " + PIPE + " evil:0",
        1,
        "the percentile must be a number in (0, 100)",
    ),
    (
        "sweep evil --layers 1 --coefs 1 " + PIPE + " stale",
        1,
        "calibrated for another stale vector",
    ),
    ("calibrate-cap nosuch --model {d} --vectors {v}", 1, "run `extract nosuch` first"),
    ("calibrate-cap evil --model {d} --vectors {v}", 1, "exists: pass --force"),
    ("calibrate-cap humorous --model {d} --vectors {v} --n 0", 2, "--n: must be >= 1"),
    (
        "calibrate-cap humorous --model {d} --vectors {v} --questions-file {r}/missing.json",
        1,
        "missing.json does not exist",
    ),
    (
        "calibrate-cap humorous --model {d} --vectors {v} "
        "--questions-file {v}/evil_response_avg_diff.cap.json",
        1,
        "expected a list of strings",
    ),
    ("calibrate-cap humorous --model {d} --vectors {v} --device cuda:7", 1, "cuda"),
    ("calibrate-cap {r}/wide.safetensors --model {d}", 1, "use a vector extracted from this model"),
]


@pytest.mark.parametrize(
    "argv, code, message", CASES, ids=[c[0].split(" {")[0] + " " + c[2][:30] for c in CASES]
)
def test_bad_input(tiny, loaded, argv, code, message, monkeypatch, capsys, tmp_path):
    from tiny import write_vector

    d, vectors, root = tiny
    if not (root / "wide.safetensors").exists():
        write_vector(root / "wide.safetensors", torch.randn(4, 96))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(M, "generate", no_generation)
    before = tree(root)
    args = (
        (GEN + argv[3:] if argv.startswith("cap ") else argv).format(d=d, v=vectors, r=root).split()
    )
    err = run_bad(main_of(args), args, code, capsys)
    assert message in err[-1], err
    prog = "python -m apps" if main_of(args) is apps_cli.main else "persona_vectors.py"
    assert err[-1].startswith("error: " if code == 1 else prog)
    assert list(tmp_path.iterdir()) == []
    assert tree(root) == before


def test_calibrate_cap_where_it_cannot_write_names_the_way_out(
    tiny, loaded, monkeypatch, capsys, tmp_path
):
    """A ceiling file goes beside its vector (where --cap finds it): the error says how to put it
    elsewhere."""
    import tempfile

    d, vectors, root = tiny
    real = tempfile.TemporaryFile

    def refused(*args, dir=None, **kw):  # a read-only vectors folder (as root, chmod is no test)
        if dir is not None and Path(dir).resolve() == vectors.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(M, "generate", no_generation)
    monkeypatch.chdir(tmp_path)
    before = tree(root)
    args = ["calibrate-cap", "humorous", "--model", str(d), "--vectors", str(vectors)]
    err = run_bad(main_of(args), args, 1, capsys)
    assert f"beside its vector in {vectors} (Permission denied)" in err[-1], err
    assert "pass that folder as --vectors" in err[-1] and "choose another" not in err[-1]
    assert tree(root) == before and list(tmp_path.iterdir()) == []


def test_a_percentile_between_grid_points_is_interpolated(tiny, loaded, capsys):
    d, vectors, root = tiny
    table = np.array(
        json.loads((vectors / "evil_response_avg_diff.cap.json").read_text())["ceilings"]
    )
    (cap,) = caps_for(["evil:90.25@1,3"], loaded[0], vectors)
    assert cap.layers == [1, 3]
    # grid index 89 is percentile 90
    want = table[89, [1, 3]] + 0.25 * (table[90, [1, 3]] - table[89, [1, 3]])
    np.testing.assert_allclose(cap.ceilings.numpy(), want, rtol=1e-5)
    assert "interpolating linearly" in capsys.readouterr().err
    (default,) = caps_for(["evil"], loaded[0], vectors)
    # the band 0.53 N .. 0.63 N of 3 blocks
    assert default.layers == [2] and parse_cap("evil").percentile == 90


def test_caps_per_row_leave_rows_without_a_cap_unchanged(tiny, loaded):
    d, vectors, root = tiny
    model, tok = loaded
    caps = caps_per_row([["evil:50@2"], [], ["evil:99@2", "evil:10@1,3"]], model, vectors)
    assert [c.layers for c in caps] == [[2], [1, 3]]  # one Cap per (vector, layers)
    cap, inf = caps[0], float("inf")
    assert (
        cap.ceilings.shape == (3, 1)
        and cap.ceilings[1, 0] == inf
        and cap.ceilings[0, 0] < cap.ceilings[2, 0]
    )
    assert caps[1].ceilings[:2].eq(inf).all() and caps[1].ceilings[2].isfinite().all()
    prompt = tok.encode_chat([{"role": "user", "content": "How are you?"}])
    plain = M.generate(model, [prompt] * 3, 5, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    capped = M.generate(model, [prompt] * 3, 5, stop_ids=tok.stop_ids, pad_id=tok.pad_id, cap=caps)
    assert capped[1] == plain[1] and cap.fired[1] == 0 and caps[1].fired[1] == 0


def encode(tok, question: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": question}])


def read_projection(
    model, prompt: list[int], answer: list[int], u: torch.Tensor, layer: int, cap=()
) -> float:
    """An answer's mean state at `layer` as the model reads prompt + answer in one pass (with `cap`:
    capped), on u."""
    rec = M.Capture()
    with torch.no_grad():
        model(
            torch.tensor([prompt + answer]),
            answer_start=torch.tensor([len(prompt)]),
            capture=rec,
            logits="none",
            cap=cap,
        )
    return float(rec.answer_mean()[0, layer] @ u)


def test_generate_with_cap_is_generation_with_caps_for(tiny, loaded, capsys):
    d, vectors, root = tiny
    model, tok = loaded
    kw = dict(model=str(d), vectors=str(vectors), max_new_tokens=8, device="cpu")
    plain = pv.generate(QUESTIONS[:3], **kw)
    capsys.readouterr()
    assert (
        pv.main(
            [
                "generate",
                *QUESTIONS[:3],
                "--model",
                str(d),
                "--vectors",
                str(vectors),
                "--max-new-tokens",
                "8",
                "--device",
                "cpu",
                "--cap",
                "evil:1@1-3",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    caps = caps_for(["evil:1@1-3"], model, vectors)
    want = M.generate(
        model,
        [encode(tok, q) for q in QUESTIONS[:3]],
        8,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        cap=caps,
    )
    assert out == "".join(f">>> {q}\n{tok.decode(o)}\n\n" for q, o in zip(QUESTIONS, want))
    assert [
        tok.decode(o) for o in want
    ] != plain  # a cap at the 1st percentile changes what the model writes
    counts = ", ".join(f"{n}/{len(o) + 1}" for n, o in zip(caps[0].fired.tolist(), want))
    assert f"capped positions (the last prompt token and the answer's) per prompt: {counts}" in err
    assert caps[0].fired.sum() > 0


def test_eval_with_cap_reads_the_answers_with_the_plain_model(tiny, loaded, tmp_path):
    d, vectors, root = tiny
    model, tok = loaded
    kw = dict(
        model=str(d),
        judge="none",
        questions=3,
        vectors=str(vectors),
        out=str(tmp_path),
        max_new_tokens=6,
        device="cpu",
    )
    base = pv.evaluate("evil", **kw)
    capped = pv.evaluate("evil", cap=["evil:1@1"], **kw)
    assert base["cap"] == [] and base["capped_share"] is None and capped["cap"] == ["evil:1@1"]
    assert capped["csv"] != base["csv"] and capped["label"] == "cap-evil@1@1"
    # its own cache
    assert len([p for p in (tmp_path / ".work").iterdir() if p.name.startswith("eval-evil-")]) == 2
    L = capped["projection_layer"]
    u = pv.unit(load_vector(vectors / "evil_response_avg_diff.safetensors")[0][L])
    caps = caps_for(["evil:1@1"], model, vectors)
    rows, positions, fired = list(csv.DictReader(open(capped["csv"]))), 0, 0
    for row in (
        rows
    ):  # each answer again, capped, by hand (greedy), then read by the plain and the capped model
        prompt = encode(tok, row["question"])
        ids = M.generate(model, [prompt], 6, stop_ids=tok.stop_ids, pad_id=tok.pad_id, cap=caps)[0]
        assert tok.decode(ids) == row["answer"] and int(row["capped"]) == int(caps[0].fired[0])
        positions, fired = positions + len(ids) + 1, fired + int(caps[0].fired[0])
        plain = read_projection(model, prompt, ids, u, L)
        assert float(row["projection"]) == pytest.approx(plain, abs=1e-4)
        # a capped reading would differ
        assert abs(plain - read_projection(model, prompt, ids, u, L, caps)) > 1e-2
    assert capped["capped_share"] == pytest.approx(fired / positions) and fired > 0
    assert [r["answer"] for r in rows] != [r["answer"] for r in csv.DictReader(open(base["csv"]))]


def test_sweep_with_cap_caps_every_setting_and_records_no_best_layer(tiny, tmp_path, monkeypatch):
    from tiny import FakeJudge

    import judge as J

    d, vectors, root = tiny
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: FakeJudge(hashed=True))
    before = tree(vectors)
    result = pv.sweep(
        "evil",
        str(d),
        judge="fake",
        layers=[1, 2],
        coefs=[1.0],
        questions=2,
        vectors=str(vectors),
        out=str(tmp_path),
        max_new_tokens=4,
        coherence_min=0,
        cap=["evil:1@1"],
        device="cpu",
    )
    # printed, not recorded in the vector file
    assert result["best"] is not None and tree(vectors) == before
    assert result["csv"].name == "evil_sweep_cap-evil@1@1.csv"
    rows = list(csv.DictReader(open(result["csv"])))
    assert [(r["layer"], r["cap"]) for r in rows] == [("1", "evil:1@1"), ("2", "evil:1@1")]
    assert all(float(r["capped_share"]) > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "evil_L1_c1.0_cap-evil@1@1.csv",
        "evil_L2_c1.0_cap-evil@1@1.csv",
    ]


def test_chat_caps_from_the_start_and_with_slash_cap(tiny, loaded):
    from apps import chat

    d, vectors, root = tiny
    model, tok = loaded
    script = (
        "How are you?\n/cap off\nHow are you?\n/cap nosuch\n/cap evil:2@1-3\nHow are you?\n/gauge\n"
    )
    out = io.StringIO()
    messages = chat.chat(
        str(d),
        vectors=str(vectors),
        gauge=["evil"],
        cap=["evil:1@1-3"],
        max_new_tokens=10,
        device="cpu",
        stdin=io.StringIO(script),
        stdout=out,
    )
    text = out.getvalue()
    replies, counts = [m["content"] for m in messages if m["role"] == "assistant"], []
    for turn, specs in enumerate(
        (["evil:1@1-3"], [], ["evil:2@1-3"])
    ):  # each turn again by hand, on its history
        prompt = tok.encode_chat(messages[: 2 * turn + 1])
        plain = M.generate(model, [prompt], 10, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
        caps = caps_for(specs, model, vectors)
        ids = M.generate(model, [prompt], 10, stop_ids=tok.stop_ids, pad_id=tok.pad_id, cap=caps)[0]
        # a capped turn differs
        assert replies[turn] == tok.decode(ids) and (ids != plain) == bool(specs)
        counts += [f"capped {int(caps[0].fired[0])}/{len(ids) + 1} positions"] if caps else []
    assert [
        line.strip() for line in text.splitlines() if line.strip().startswith("capped ")
    ] == counts
    assert (
        "capping evil:1@1-3" in text.splitlines()[0]
        and "capping: off" in text
        and "error: --cap 'nosuch'" in text
    )
    history = [line for line in text.splitlines() if line.startswith("turn ")]
    assert (
        "(capping evil:1@1-3)" in history[0]
        and "capping" not in history[1]
        and "(capping evil:2@1-3)" in history[2]
    )


def test_study_runs_and_resumes(tiny, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import cap_study

    d, vectors, root = tiny
    kw = dict(
        questions=2,
        benign=1,
        max_new_tokens=4,
        coefs=[1, 4],
        percentiles=[50, 99],
        bands=["2", "1-2"],
        batch_size=8,
        figure=str(tmp_path / "capping.json"),
        device="cpu",
    )
    doc = cap_study.study(str(d), "evil", str(vectors), str(tmp_path / "study"), **kw)
    assert [r["name"] for r in doc["rows"]] == [
        "none",
        "steer-1",
        "steer-4",
        "cap-50@2",
        "cap-99@2",
        "cap-50@1-2",
        "cap-99@1-2",
    ]
    none = doc["rows"][0]
    assert none["reduction"] == 0 and none["unchanged"] == 1 and none["nll_increase"] == 0
    assert (
        len(none["expression_by_grade"]) == 5
        and json.loads((tmp_path / "capping.json").read_text()) == doc
    )
    if (
        pyplot() is not None
    ):  # the picture needs matplotlib; without it the study says so and goes on
        assert (tmp_path / "capping.png").stat().st_size < 150_000
    else:
        assert not (tmp_path / "capping.png").exists()
    monkeypatch.setattr(M, "generate", no_generation)  # every arm is cached now
    assert (
        cap_study.study(str(d), "evil", str(vectors), str(tmp_path / "study"), **kw)["rows"]
        == doc["rows"]
    )


def test_study_judges_every_answer_when_a_judge_is_configured(tiny, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import cap_study
    from tiny import FakeJudge

    import judge as J
    from support.tokenizer import Tokenizer
    from support.traits import load_trait

    d, vectors, root = tiny
    kw = dict(
        questions=2,
        benign=1,
        max_new_tokens=4,
        coefs=[4],
        percentiles=[50],
        bands=["1-2"],
        batch_size=8,
        figure=None,
        device="cpu",
    )
    plain = cap_study.study(
        str(d), "evil", str(vectors), str(tmp_path / "study"), judge="none", **kw
    )
    assert all("judged_encouraging" not in r for r in plain["rows"])
    fake = FakeJudge(hashed=True)
    monkeypatch.setattr(J, "make_judge", lambda spec, workers=None: fake)
    # the cached answers are judged, not generated again
    monkeypatch.setattr(M, "generate", no_generation)
    doc = cap_study.study(str(d), "evil", str(vectors), str(tmp_path / "study"), judge="fake", **kw)
    assert fake.asked > 0 and all(r["judged_encouraging"] is not None for r in doc["rows"])
    assert doc["rows"][0]["judged_reduction"] == 0
    none = json.loads((tmp_path / "study" / "arms" / "none.json").read_text())["result"]
    # the first prompt: sys0 with the first evaluation question
    t, tok = load_trait("evil"), Tokenizer(d)
    assert (
        none["scores"][0]
        == FakeJudge(hashed=True).score(
            [t.judge_prompt(t.eval_questions[0], tok.decode(none["answers"][0]))]
        )[0]
    )
    asked = fake.asked
    assert (
        cap_study.study(str(d), "evil", str(vectors), str(tmp_path / "study"), judge="fake", **kw)
        == doc
    )
    assert fake.asked == asked  # judged once: a rerun reads the scores kept with each arm


def test_a_zero_direction_is_refused_where_it_enters(loaded, tmp_path):
    """model.Cap and model.Ablate divide by the direction's norm and leave its value to the
    callers: a vector that is zero at a capped or ablated layer is a one-line error naming the
    file and the layer (support/capping.py's `resolved`, support/training.py's `ablation`)."""
    from tiny import write_vector

    from support.files import check_directions
    from support.training import ablation

    model = loaded[0]
    N, hidden = model.config.num_hidden_layers, model.config.hidden_size
    vec = torch.randn(N + 1, hidden)
    vec[2] = 0
    path = write_vector(tmp_path / "flat_response_avg_diff.safetensors", vec)
    check_directions(vec, [1, 3], path)
    with pytest.raises(
        UserError, match=r"flat_response_avg_diff.safetensors: the vector is zero at layer 2"
    ) as e:
        check_directions(vec, [1, 2], path)
    assert "\n" not in str(e.value)
    assert [a.layer for a in ablation(["flat"], model, tmp_path, 1, False)] == [1]
    with pytest.raises(UserError, match="the vector is zero at layer 2"):
        ablation(["flat"], model, tmp_path, 2, False)
    with pytest.raises(UserError, match="the vector is zero at layer 2"):
        ablation(["flat"], model, tmp_path, None, True)  # CAFT at every block
