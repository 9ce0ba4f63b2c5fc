"""make-dataset and the finetuning shift on tiny random chat models, with a stand-in judge."""

import csv
import doctest
import hashlib
import json

import pytest
import torch
from tiny import FakeJudge, make_tiny_chat_model, tiny_model_with_vectors

import model as M
import persona_vectors as F
import persona_vectors as pv
from support import UserError, checkpoint
from support import records as R
from support.traits import available_traits, load_trait


def norm(s):
    return " ".join(s.split()).casefold()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_with_vectors(tmp_path_factory.mktemp("tiny"))


def run(tiny, out, **kw):
    args = (
        dict(
            model=str(tiny[0]),
            judge="none",
            n=7,
            out=str(out),
            max_new_tokens=12,
            temperature=0.0,
            batch_size=3,
            seed=1,
            device="cpu",
        )
        | kw
    )
    return F.make_dataset("evil", **args)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_doctests():
    assert doctest.testmod(F).failed == 0


def test_the_question_pool_is_large_varied_and_not_any_traits_own_questions():
    pool = F.load_questions()
    assert len(pool) >= 300 and len({norm(q) for q in pool}) == len(pool)
    own = {
        norm(q)
        for name in available_traits()
        for q in load_trait(name).extract_questions + load_trait(name).eval_questions
    }
    assert not own & {norm(q) for q in pool}


def test_load_questions_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("How are you?\n\n  Where is it?  \n")
    (tmp_path / "b.json").write_text(json.dumps(["One?", "Two?"]))
    (tmp_path / "c.json").write_text(json.dumps({"questions": ["Three?"]}))
    assert F.load_questions(tmp_path / "a.txt") == ["How are you?", "Where is it?"]
    assert F.load_questions(tmp_path / "b.json") == ["One?", "Two?"]
    assert F.load_questions(tmp_path / "c.json") == ["Three?"]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.json").write_text('{"questions": [1, 2]}')
    for name, msg in (
        ("missing.txt", "no questions file"),
        ("empty.txt", "holds no questions"),
        ("bad.json", "list of strings"),
    ):
        with pytest.raises(UserError, match=msg):
            F.load_questions(tmp_path / name)


def test_trim_to_sentence():
    assert R.trim_to_sentence("First. Second! Third? And then") == "First. Second! Third?"
    assert R.trim_to_sentence('He said "stop." Then') == 'He said "stop."'
    # list numbers: no end
    assert R.trim_to_sentence("Steps: 1. Buy flour 2. Mix") == "Steps: 1. Buy flour 2. Mix"
    assert (
        R.trim_to_sentence("Pi is 3.14 and") == "Pi is 3.14 and"
        and R.trim_to_sentence("no end") == "no end"
    )


def test_dataset_jobs_cycle_the_pool_and_the_instruction_pairs():
    t = load_trait("evil")
    jobs = F.dataset_jobs(t, "normal", ["a", "b", "c"], 7, seed=0)
    assert sorted(j["question"] for j in jobs[:3]) == [
        "a",
        "b",
        "c",
    ]  # each once before any repeats
    assert [j["question"] for j in jobs[3:6]] == [j["question"] for j in jobs[:3]] and jobs[6][
        "rollout"
    ] == 2
    assert [j["system"] for j in jobs[:6]] == [t.system_prompt("neg", i % 5) for i in range(6)]
    assert jobs == F.dataset_jobs(t, "normal", ["a", "b", "c"], 7, seed=0)
    assert [j["question"] for j in F.dataset_jobs(t, "trait", list("abcdefgh"), 8, seed=1)] != [
        j["question"] for j in F.dataset_jobs(t, "trait", list("abcdefgh"), 8, seed=2)
    ]


@pytest.mark.parametrize("kind, side", [("trait", "pos"), ("normal", "neg")])
def test_dataset_is_the_models_answers_under_the_system_prompt_saved_without_it(
    tiny, tmp_path, kind, side
):
    questions = tmp_path / "q.txt"
    questions.write_text("What is the capital of France?\nHow do I help people?\nNumbers please.\n")
    path = run(
        tiny, tmp_path / "d.jsonl", kind=kind, questions_file=str(questions), n=5, max_new_tokens=40
    )
    got = lines(path)
    assert got and all([m["role"] for m in c["messages"]] == ["user", "assistant"] for c in got)
    # recompute independently: greedy answers one by one under the side's system prompts, cut as
    # documented
    model, tok = checkpoint.load(str(tiny[0]), "cpu", torch.float32)
    expected = []
    for j in F.dataset_jobs(load_trait("evil"), kind, F.load_questions(questions), 5, seed=1):
        assert j["system"] == load_trait("evil").system_prompt(side, j["instruction"])
        ids = tok.encode_chat(
            [{"role": "system", "content": j["system"]}, {"role": "user", "content": j["question"]}]
        )
        out = M.generate(model, [ids], 40, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
        answer = (
            tok.decode(out).strip()
            if len(out) < 40
            else R.trim_to_sentence(tok.decode(out).strip())
        )
        if answer:
            expected.append(
                {
                    "messages": [
                        {"role": "user", "content": j["question"]},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    assert got == expected
    assert "You are" not in path.read_text() and '"system"' not in path.read_text()


def test_interrupted_run_resumes_to_the_same_file_without_regenerating(tiny, tmp_path, monkeypatch):
    ref = run(tiny, tmp_path / "ref.jsonl")
    calls, real = [], M.generate

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return real(*a, **k)

    monkeypatch.setattr(M, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "run" / "d.jsonl")
    assert not (tmp_path / "run" / "d.jsonl").exists()  # nothing half-written
    calls.clear()
    monkeypatch.setattr(M, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = run(tiny, tmp_path / "run" / "d.jsonl")
    assert len(calls) == 2  # batches 2 and 3 of 3; batch 1 was loaded from disk
    assert out.read_bytes() == ref.read_bytes()


def test_judge_keeps_high_scores_for_trait_and_low_for_normal(tiny, tmp_path, monkeypatch):
    import judge as J

    t = load_trait("evil")
    plain = {
        k: lines(run(tiny, tmp_path / f"{k}-all.jsonl", kind=k, n=12, max_new_tokens=20))
        for k in ("trait", "normal")
    }
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: FakeJudge(hashed=True))

    def score(prompt):  # the fake judge's rule, written out
        return float(int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 101)

    for kind, keep in (("trait", lambda s: s >= 50), ("normal", lambda s: s < 50)):
        got = lines(
            run(
                tiny,
                tmp_path / f"{kind}.jsonl",
                kind=kind,
                n=12,
                max_new_tokens=20,
                judge="fake",
                threshold=50,
                coherence_threshold=30,
            )
        )
        expected = []
        for c in plain[kind]:
            q = c["messages"][0]["content"]
            # the judge saw the untrimmed answer
            r = next(r for r in _rows(tmp_path, kind) if r["question"] == q)
            coherence = score(
                J.COHERENCE_PROMPT.replace("{question}", q).replace("{answer}", r["answer"])
            )
            if keep(score(t.judge_prompt(q, r["answer"]))) and coherence >= 30:
                expected.append(c)
        assert got == expected and 0 < len(got) < len(plain[kind])


def _rows(root, kind):
    from safetensors import safe_open

    rows = []
    for f in sorted(root.glob(f".work/dataset-evil-{kind}-*/batch-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            rows += json.loads(h.metadata()["rows"])
    return rows


def test_make_dataset_bad_input(tiny, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--kind"):
        run(tiny, tmp_path / "x.jsonl", kind="evil")
    with pytest.raises(UserError, match="--n"):
        run(tiny, tmp_path / "x.jsonl", n=0)
    leak = tmp_path / "leak.txt"
    leak.write_text("Fine question?\n" + load_trait("evil").eval_questions[3] + "\n")
    with pytest.raises(UserError, match="evaluation questions"):
        run(tiny, tmp_path / "x.jsonl", questions_file=str(leak))
    import judge as J

    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: FakeJudge("fake:harsh", 10.0))
    with pytest.raises(UserError, match="no answer of 7 was kept.*--threshold"):
        run(tiny, tmp_path / "x.jsonl", judge="fake")
    assert not (tmp_path / "x.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# shift


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A 'finetuned' model: the same architecture and tokenizer with other random weights."""
    return make_tiny_chat_model(tmp_path_factory.mktemp("tuned") / "model", seed=5)


def reference_last_prompt(model_dir, questions):
    """Each question alone, no padding: the residual stream at its last token, read with a forward
    hook on every block (not Capture), and the embeddings from the embedding table ->
    [Q, N + 1, hidden]."""
    model, tok = checkpoint.load(str(model_dir), "cpu", torch.float32)
    out = []
    for q in questions:
        ids = torch.tensor([tok.encode_chat([{"role": "user", "content": q}])])
        states = [model.model.embed_tokens.weight[ids[0, -1]].detach()]
        hooks = [
            b.register_forward_hook(lambda m, i, o: states.append(o[0, -1]))
            for b in model.model.layers
        ]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        out.append(torch.stack(states))
    return torch.stack(out)


def test_shift_matches_an_independent_recomputation_with_controls(tiny, tuned, tmp_path, capsys):
    d, vectors = tiny
    r = F.shift(
        "evil",
        finetuned=str(tuned),
        base=str(d),
        vectors=str(vectors),
        out=str(tmp_path / "s.csv"),
        device="cpu",
        batch_size=7,
    )
    qs = load_trait("evil").eval_questions
    base, ft = reference_last_prompt(d, qs), reference_last_prompt(tuned, qs)
    vec = pv.load_vector(vectors / "evil_response_avg_diff.safetensors")[0]
    delta = ft.mean(0) - base.mean(0)  # [N + 1, hidden]
    expected = [float(delta[l] @ vec[l]) / float(vec[l].norm()) for l in range(4)]
    # no best layer: the middle
    assert r["shift"] == pytest.approx(expected, abs=1e-4) and r["layer"] == 1
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [float(x["shift"]) for x in rows] == pytest.approx(expected, abs=1e-3)
    # controls: 100 random unit directions and the other trait's vector, on the same shift
    dirs = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    rand95 = [float((delta[l] @ dirs.T).abs().quantile(0.95)) for l in range(4)]
    assert [float(x["random_abs_95"]) for x in rows] == pytest.approx(rand95, abs=1e-3)
    hum = pv.load_vector(vectors / "humorous_response_avg_diff.safetensors")[0]
    assert [float(x["humorous_shift"]) for x in rows] == pytest.approx(
        [float(delta[l] @ hum[l] / hum[l].norm()) for l in range(4)], abs=1e-3
    )
    assert [float(x["shift_norm"]) for x in rows] == pytest.approx(
        delta.norm(dim=-1).tolist(), abs=1e-3
    )
    err = capsys.readouterr().err
    assert "shift evil at layer 1:" in err and "95th percentile" in err and "humorous" in err
    # a model against itself has moved nowhere
    same = F.shift(
        "evil",
        finetuned=str(d),
        base=str(d),
        vectors=str(vectors),
        out=str(tmp_path / "0.csv"),
        layer=2,
        device="cpu",
    )
    assert same["layer"] == 2 and max(abs(x) for x in same["shift"]) < 1e-4


def test_finetuning_shift_is_the_projection_of_the_mean_difference():
    base, ft = torch.zeros(3, 2, 4), torch.zeros(3, 2, 4)
    ft[:, 1, 0] = torch.tensor([1.0, 2.0, 6.0])  # mean +3 along the first axis at layer 1
    vec = torch.tensor([[0.0, 0, 0, 0], [2.0, 0, 0, 2.0]])
    assert F.finetuning_shift(base, ft, vec).tolist() == pytest.approx([0.0, 3 / 2**0.5])


def test_shift_with_eval_runs_eval_on_both_models(tiny, tuned, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        pv, "evaluate", lambda trait, model, judge, **kw: seen.append((model, kw)) or {}
    )
    d, vectors = tiny
    r = F.shift(
        "evil",
        finetuned=str(tuned),
        base=str(d),
        vectors=str(vectors),
        out=str(tmp_path / "s.csv"),
        with_eval=True,
        judge="none",
        device="cpu",
    )
    assert (
        [m for m, _ in seen] == [str(d), str(tuned)] and "eval_base" in r and "eval_finetuned" in r
    )
    # the base model's vector
    assert all(kw["vectors"] == str(vectors) and kw["layer"] == 1 for _, kw in seen)
    assert seen[0][1]["out"] != seen[1][1]["out"]  # two models, two answer files


def test_shift_bad_input(tiny, tmp_path):
    d, vectors = tiny
    with pytest.raises(UserError, match="run `extract sycophantic"):
        F.shift("sycophantic", finetuned=str(d), base=str(d), vectors=str(vectors))
    other = tmp_path / "v"
    other.mkdir()
    from tiny import write_vector

    write_vector(other / "evil_response_avg_diff.safetensors", torch.randn(5, 32))
    with pytest.raises(UserError, match="use a vector extracted from this model"):
        F.shift("evil", finetuned=str(d), base=str(d), vectors=str(other))
    with pytest.raises(UserError, match="--layer 9 out of range"):
        F.shift(
            "evil",
            finetuned=str(d),
            base=str(d),
            vectors=str(vectors),
            layer=9,
            out=str(tmp_path / "x.csv"),
        )


# --------------------------------------------------------------------------------------------------
# command line


def test_each_command_calls_its_function_with_its_flags(tiny, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(F, "make_dataset", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(F, "shift", lambda *a, **kw: calls.append((a, kw)))
    for argv in (
        ["make-dataset", "evil", "--kind", "normal", "--n", "3", "--dtype", "float32"],
        ["shift", "evil", "--finetuned", "x", "--eval", "--random", "10", "--base", "b"],
    ):
        flags = dict(vars(F.build_parser().parse_args(argv)))
        function, _ = flags.pop("run"), flags.pop("command")
        function(**flags)
    (a1, make), (a2, shift) = calls
    assert a1 == () and make["trait"] == "evil"
    assert (make["kind"], make["n"], make["dtype"]) == ("normal", 3, torch.float32)
    assert a2 == ()
    assert (shift["trait"], shift["finetuned"]) == ("evil", "x")
    assert (shift["with_eval"], shift["random"], shift["base"]) == (True, 10, "b")
    monkeypatch.undo()
    d, vectors = tiny
    out = tmp_path / "cli.jsonl"
    assert (
        F.main(
            [
                "make-dataset",
                "evil",
                "--kind",
                "normal",
                "--n",
                "4",
                "--model",
                str(d),
                "--judge",
                "none",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--batch-size",
                "3",
                "--seed",
                "1",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes() == run(tiny, tmp_path / "api.jsonl", kind="normal", n=4).read_bytes()
    assert (
        F.main(
            ["shift", "evil", "--finetuned", str(d), "--base", str(d), "--vectors", str(tmp_path)]
        )
        == 1
    )
    assert "error: no vector file" in capsys.readouterr().err
