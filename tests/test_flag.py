"""Data flagging (apps/flagging.py): ΔP against an independent recompute, resume, shards,
selection, bad input."""

import csv
import json

import pytest
import torch
from tiny import tiny_model_with_vectors, write_vector

import model as M
import persona_vectors as pv
from apps import __main__ as apps_cli
from apps import flagging
from support import UserError, checkpoint
from support.files import load_vector

WORDS = (
    "the capital of France is Paris an evil assistant wants to harm people a helpful one help them"
).split()


def conversation(i: int) -> dict:
    """Sample i: varied lengths, some with a system prompt or an earlier exchange, a reply of 1 to
    12 words."""
    say = lambda n, off: " ".join(WORDS[(off + j) % len(WORDS)] for j in range(n))  # noqa: E731
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
    if i % 4 == 1:
        messages += [
            {"role": "user", "content": say(3, i)},
            {"role": "assistant", "content": say(2, i + 1)},
        ]
    messages += [
        {"role": "user", "content": say(2 + i % 5, i)},
        {"role": "assistant", "content": say(1 + (7 * i) % 12, i + 3)},
    ]
    return {"messages": messages}


def write_data(path, n: int, bad: dict[int, str] = ()) -> list[str]:
    """n conversations, with the lines in `bad` (1-based line number -> text) put in their
    places."""
    bad, lines, i = dict(bad), [], 0
    while i < n or len(lines) + 1 in bad:
        if len(lines) + 1 in bad:
            lines.append(bad[len(lines) + 1])
        else:
            lines.append(json.dumps(conversation(i)))
            i += 1
    path.write_text("".join(x + "\n" for x in lines))
    return lines


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_with_vectors(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(tiny):
    return checkpoint.load(str(tiny[0]), "cpu", torch.float32)


def run(tiny, files, out, **kw):
    d, vectors = tiny
    args = (
        dict(
            trait=["evil", "humorous"],
            model=str(d),
            layer=2,
            vectors=str(vectors),
            out=str(out),
            max_new_tokens=6,
            batch_size=3,
            chunk_size=4,
            device="cpu",
        )
        | kw
    )
    return flagging.flag([str(f) for f in files], **args)


def read_rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def states(model, ids: list[int]) -> torch.Tensor:
    """Every token's state at hidden index 2, from a plain batch-1 forward pass: [T, hidden]."""
    cap = M.Capture(token_layers=(2,))
    with torch.no_grad():
        model(torch.tensor([ids]), capture=cap, logits="none")
    return cap.tokens[2][0][0]


def test_delta_p_matches_an_independent_recompute(tiny, loaded, tmp_path):
    lines = write_data(
        tmp_path / "data.jsonl",
        9,
        bad={
            3: "not json",
            6: json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            8: "",
            10: json.dumps({"messages": "x"}),
        },
    )
    r = run(tiny, [tmp_path / "data.jsonl"], tmp_path / "out", format="jsonl")
    assert r["complete"]
    rows = read_rows(r["outputs"][str(tmp_path / "data.jsonl")])
    assert [row["line"] for row in rows] == [
        n for n, x in enumerate(lines, 1) if n not in (3, 6, 8, 10)
    ]
    file_stats = r["stats"]["files"][str(tmp_path / "data.jsonl")]
    assert file_stats["skipped"] == {
        flagging.NOT_JSON: {"count": 1, "first_lines": [3]},
        "no `messages` list": {"count": 1, "first_lines": [10]},
        "no assistant turn after a user turn": {"count": 1, "first_lines": [6]},
    }
    model, tok = loaded
    units = {
        t: (v := load_vector(tiny[1] / f"{t}_response_avg_diff.safetensors")[0][2]) / v.norm()
        for t in ("evil", "humorous")
    }
    checked_base = 0
    for row in rows:
        messages = json.loads(lines[row["line"] - 1])["messages"]
        prompt, y = tok.encode_chat(messages[:-1]), tok.encode(messages[-1]["content"])
        h = states(model, prompt + y)
        a_y, last = h[len(prompt) :].mean(0), h[len(prompt) - 1]
        y_base = M.generate(model, [prompt], 6, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[
            0
        ]  # greedy, alone
        assert row["base_tokens"] == len(y_base) and row["response_tokens"] == len(y)
        a_base = states(model, prompt + y_base)[len(prompt) :].mean(0) if y_base else None
        for t, u in units.items():
            assert row[f"{t}_projection"] == pytest.approx(float(a_y @ u), abs=1e-4)
            assert row[f"{t}_prompt_last"] == pytest.approx(float(last @ u), abs=1e-4)
            if a_base is None:
                assert row[f"{t}_delta_p"] is None
            else:
                assert row[f"{t}_delta_p"] == pytest.approx(float((a_y - a_base) @ u), abs=1e-4)
                checked_base += 1
    assert checked_base >= 2 * 6  # most rows have a base response to compare
    s = file_stats["traits"]["evil"]
    dps = [row["evil_delta_p"] for row in rows if row["evil_delta_p"] is not None]
    assert s["n"] == len(dps) and s["mean"] == pytest.approx(sum(dps) / len(dps))
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1] and s["q05"] <= s["q50"] <= s["q95"]


def test_sampled_base_responses_are_averaged(loaded):
    model, tok = loaded
    prompts = [
        tok.encode_chat([{"role": "user", "content": q}])
        for q in ("the capital of France", "evil people")
    ]
    ys = [tok.encode("Paris is the capital"), tok.encode("help them")]
    got = pv.response_and_base(model, tok, prompts, ys, 5, samples=3, seed=7, temperature=20.0)
    # the same sampling again (same seed, same batch), then each base response through its own
    # forward pass
    outs = M.generate(
        model,
        [p for p in prompts for _ in range(3)],
        5,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        temperature=20.0,
        seed=7,
    )
    # the three responses differ, so the average means something
    assert len({tuple(o) for o in outs[:3]}) > 1
    for b, p in enumerate(prompts):
        means = [states(model, p + o)[len(p) :].mean(0) for o in outs[3 * b : 3 * b + 3] if o]
        assert torch.allclose(got["base"][b, 2], torch.stack(means).mean(0), atol=1e-4)
        assert float(got["base_tokens"][b]) == pytest.approx(
            sum(len(o) for o in outs[3 * b : 3 * b + 3]) / 3
        )
        assert torch.allclose(
            got["response"][b, 2], states(model, p + ys[b])[len(p) :].mean(0), atol=1e-4
        )


def test_interrupted_run_resumes_without_redoing_chunks(tiny, tmp_path, monkeypatch):
    write_data(tmp_path / "data.jsonl", 11, bad={5: "{oops"})
    ref = run(tiny, [tmp_path / "data.jsonl"], tmp_path / "ref")
    real, calls = flagging.score_chunk, []

    def dies_in_second_chunk(*a, **kw):
        calls.append(kw.get("progress", ""))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while scoring the second chunk
        return real(*a, **kw)

    monkeypatch.setattr(flagging, "score_chunk", dies_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, [tmp_path / "data.jsonl"], tmp_path / "run")
    assert not (tmp_path / "run" / "data.flag.csv").exists()  # nothing half-written
    assert not list((tmp_path / "run").rglob("*.tmp"))
    calls.clear()
    monkeypatch.setattr(flagging, "score_chunk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = run(tiny, [tmp_path / "data.jsonl"], tmp_path / "run")
    assert len(calls) == 2  # 12 lines in chunks of 4: the first chunk was kept, two were left
    key = str(tmp_path / "data.jsonl")
    assert got["outputs"][key].read_bytes() == ref["outputs"][key].read_bytes()
    assert got["stats"]["files"] == {
        k: v | {"per_sample": str(tmp_path / "run" / "data.flag.csv")}
        for k, v in ref["stats"]["files"].items()
    }


def test_shards_merge_to_the_single_run(tiny, tmp_path):
    write_data(tmp_path / "a.jsonl", 13)
    write_data(tmp_path / "b.jsonl", 6)
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    single = run(tiny, files, tmp_path / "single")
    first = run(tiny, files, tmp_path / "sharded", shard="0/2")
    assert not first["complete"] and not (tmp_path / "sharded" / "a.flag.csv").exists()
    with pytest.raises(UserError, match="not every chunk is scored yet"):
        flagging.flag_merge(
            [str(f) for f in files],
            ["evil", "humorous"],
            str(tiny[0]),
            layer=2,
            max_new_tokens=6,
            chunk_size=4,
            vectors=str(tiny[1]),
            out=str(tmp_path / "sharded"),
        )
    # the last shard to finish writes the outputs
    last = run(tiny, files, tmp_path / "sharded", shard="1/2")
    assert last["complete"]
    for f in files:
        assert last["outputs"][str(f)].read_bytes() == single["outputs"][str(f)].read_bytes()
    (tmp_path / "sharded" / "a.flag.csv").unlink()
    merged = flagging.flag_merge(
        [str(f) for f in files],
        ["evil", "humorous"],
        str(tiny[0]),
        layer=2,
        max_new_tokens=6,
        chunk_size=4,
        vectors=str(tiny[1]),
        out=str(tmp_path / "sharded"),
    )
    assert (
        merged["outputs"][str(files[0])].read_bytes()
        == single["outputs"][str(files[0])].read_bytes()
    )


def test_torchrun_environment_picks_the_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert flagging.parse_shard(None) == (3, 4) and flagging.parse_shard("1/2") == (1, 2)


def test_selection_writes_the_chosen_lines_unchanged(tiny, tmp_path):
    lines = write_data(tmp_path / "data.jsonl", 10, bad={4: "garbage"})
    write_data(tmp_path / "clean.jsonl", 6)
    base = run(tiny, [tmp_path / "data.jsonl"], tmp_path / "out", format="jsonl")
    rows = read_rows(base["outputs"][str(tmp_path / "data.jsonl")])
    scored = sorted(
        (r for r in rows if r["evil_delta_p"] is not None), key=lambda r: -r["evil_delta_p"]
    )
    for select, expect in (("top", scored[:3]), ("bottom", scored[-3:]), ("random", None)):
        dest = tmp_path / f"{select}.jsonl"
        run(
            tiny,
            [tmp_path / "data.jsonl"],
            tmp_path / "out",
            format="jsonl",
            select=select,
            k=3,
            select_out=str(dest),
        )
        got = dest.read_bytes().splitlines(keepends=True)
        # byte for byte
        assert len(got) == 3 and all(g.decode() in [x + "\n" for x in lines] for g in got)
        picked = sorted(lines.index(g.decode()[:-1]) + 1 for g in got)
        if expect is not None:
            assert picked == sorted(r["line"] for r in expect)
        else:
            assert set(picked) <= {r["line"] for r in scored}
    humor = tmp_path / "humor.jsonl"
    run(
        tiny,
        [tmp_path / "data.jsonl"],
        tmp_path / "out",
        select="top",
        k=1,
        select_out=str(humor),
        select_trait="humorous",
    )
    top_h = max(
        (r for r in rows if r["humorous_delta_p"] is not None), key=lambda r: r["humorous_delta_p"]
    )
    assert humor.read_text() == lines[top_h["line"] - 1] + "\n"

    above = tmp_path / "above.jsonl"
    r = run(
        tiny,
        [tmp_path / "data.jsonl"],
        tmp_path / "out",
        format="jsonl",
        select="above-reference",
        reference=str(tmp_path / "clean.jsonl"),
        select_out=str(above),
    )
    threshold = r["stats"]["reference_95th_percentile"]["evil"]
    ref_rows = read_rows(tmp_path / "out" / "clean.flag.jsonl")
    ref_dp = torch.tensor(
        [x["evil_delta_p"] for x in ref_rows if x["evil_delta_p"] is not None], dtype=torch.float64
    )
    assert threshold == pytest.approx(float(ref_dp.quantile(0.95)))
    flagged = [
        x
        for x in read_rows(r["outputs"][str(tmp_path / "data.jsonl")])
        if x["evil_above_reference"]
    ]
    assert [x["line"] for x in flagged] == [
        x["line"] for x in rows if x["evil_delta_p"] is not None and x["evil_delta_p"] > threshold
    ]
    assert above.read_text() == "".join(lines[x["line"] - 1] + "\n" for x in flagged)


def test_selection_ranks_several_files_together(tiny, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines_a = write_data(a, 7)
    lines_b = [json.dumps(conversation(i)) for i in range(7, 16)]
    b.write_text("".join(x + "\n" for x in lines_b))
    base = run(tiny, [a, b], tmp_path / "out", format="jsonl")
    scored = [
        (r["evil_delta_p"], src, r["line"])
        for src, lines in ((a, lines_a), (b, lines_b))
        for r in read_rows(base["outputs"][str(src)])
        if r["evil_delta_p"] is not None
    ]
    for select, k in (("top", 5), ("bottom", 5), ("top", 16)):
        dest = tmp_path / f"{select}{k}.jsonl"
        run(
            tiny, [a, b], tmp_path / "out", format="jsonl", select=select, k=k, select_out=str(dest)
        )
        best = sorted(scored, key=lambda x: -x[0] if select == "top" else x[0])[:k]
        expect = [
            ({a: lines_a, b: lines_b}[src])[line - 1] + "\n"
            for src, line in sorted(((s, n) for _, s, n in best), key=lambda x: (x[0] != a, x[1]))
        ]
        assert dest.read_text() == "".join(expect)  # file order, then line order


def test_histograms_overlay_every_file(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    write_data(tmp_path / "a.jsonl", 5)
    write_data(tmp_path / "b.jsonl", 5)
    r = run(tiny, [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "out")
    assert [p.name for p in r["plots"]] == ["flag_evil.png", "flag_humorous.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in r["plots"])


def _other_model_vectors(tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    write_vector(
        d / "evil_response_avg_diff.safetensors",
        torch.randn(31, 576),
        model="SmolLM2-135M-Instruct",
    )
    return d


BAD_INPUT = [  # (name, file contents, extra arguments, expected message)
    ("empty file", "", {}, "is empty"),
    ("blank lines only", "\n\n", {}, "is empty"),
    (
        "nothing scorable",
        "not json\n[1, 2]\n",
        {},
        r"no line could be scored \(1 not JSON \(line 1\); 1 no `messages` list \(line 2\)\)",
    ),
    (
        "vector from another model",
        None,
        {"vectors": "OTHER", "trait": ["evil"]},
        "extracted from SmolLM2",
    ),
    (
        "trait without a vector",
        None,
        {"trait": ["sycophantic"]},
        r"no sycophantic vector .* run `python persona_vectors.py extract sycophantic",
    ),
    (
        "--k larger than the lines",
        None,
        {"select": "top", "k": 50},
        "--k 50 but the data has only 4 non-blank",
    ),
    (
        "--k larger than the scored",
        None,
        {"select": "top", "k": 4},
        "--k 4 but only 3 samples have a ΔP",
    ),
    ("unwritable --out", None, {"out": "FILE/sub"}, "cannot write to"),
    ("bad --shard", None, {"shard": "2/2"}, "expected I/N"),
    ("greedy base with samples", None, {"base_samples": 3}, "needs --base-temperature"),
    ("--select without --k", None, {"select": "random"}, "needs --k"),
    ("above-reference without reference", None, {"select": "above-reference"}, "needs --reference"),
]


@pytest.mark.parametrize("name,text,extra,message", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_one_clear_error(tiny, tmp_path, name, text, extra, message, monkeypatch):
    src = tmp_path / "data.jsonl"
    if text is None:
        write_data(src, 3, bad={2: "{broken"})  # 4 lines, 3 samples
    else:
        src.write_text(text)
    (tmp_path / "FILE").write_text("a file, not a directory")
    extra = {
        k: str(_other_model_vectors(tmp_path))
        if v == "OTHER"
        else str(tmp_path / "FILE" / "sub")
        if v == "FILE/sub"
        else v
        for k, v in extra.items()
    }
    out = extra.pop("out", tmp_path / "out")
    with pytest.raises(UserError, match=message):
        run(tiny, [src], out, **extra)
    out = tmp_path / "out"
    assert not out.exists() or not [
        p for p in out.iterdir() if p.name != ".work"
    ]  # no output, not even part of one


def test_command_line(tiny, tmp_path, capsys):
    """`python -m apps flag` calls flag with its flags; flag-merge takes the same ones."""
    write_data(tmp_path / "d.jsonl", 4)
    d, vectors = tiny
    argv = [
        str(tmp_path / "d.jsonl"),
        "--trait",
        "evil",
        "--model",
        str(d),
        "--vectors",
        str(vectors),
        "--out",
        str(tmp_path / "o"),
        "--max-new-tokens",
        "3",
        "--format",
        "jsonl",
        "--select",
        "bottom",
        "--k",
        "2",
    ]
    args = apps_cli.build_parser().parse_args(["flag", *argv, "--device", "cpu"])
    r = args.run(args)
    assert len(read_rows(r["outputs"][str(tmp_path / "d.jsonl")])) == 4
    assert len((tmp_path / "o" / "selected_bottom_2.jsonl").read_text().splitlines()) == 2
    assert "ΔP mean" in capsys.readouterr().err
    assert apps_cli.main(["flag-merge", *argv]) == 0 and "ΔP mean" in capsys.readouterr().err


def test_the_methods_flag_matches_the_applications_flag(tiny, tmp_path, capsys):
    """persona_vectors.flag (one file, one trait, in memory) and `python -m apps flag` (streamed,
    sharded, resumable) compute ΔP with the same functions: the same values, sample by sample,
    the largest first in the method's CSV, and the same lines skipped."""
    data = tmp_path / "data.jsonl"
    write_data(data, 7, bad={2: "not json"})
    d, vectors = tiny
    dest = pv.flag(
        "evil",
        str(data),
        model=str(d),
        layer=2,
        vectors=str(vectors),
        out=str(tmp_path / "f.csv"),
        max_new_tokens=6,
        batch_size=3,
        device="cpu",
    )
    assert "skipped 1 not JSON (line 2" in capsys.readouterr().err
    ours = list(csv.DictReader(open(dest)))
    dp = [float(r["delta_p"]) for r in ours]
    assert dp == sorted(dp, reverse=True) and len(ours) == 7
    r = run(tiny, [data], tmp_path / "out", trait=["evil"], format="jsonl")
    theirs = {row["line"]: row["evil_delta_p"] for row in read_rows(r["outputs"][str(data)])}
    assert {int(x["line"]): pytest.approx(float(x["delta_p"]), abs=1e-4) for x in ours} == theirs


def test_the_methods_flag_refuses_a_bad_dataset_before_loading(tiny, tmp_path, monkeypatch):
    """A missing, non-file or non-UTF-8 dataset is one line naming it, before the model loads."""
    d, vectors = tiny
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    for name, message in [
        ("missing.jsonl", "does not exist"),
        (".", "is not a file"),
        ("latin1.jsonl", "is not UTF-8 text"),
    ]:
        with pytest.raises(UserError, match=message):
            pv.flag("evil", str(tmp_path / name), model=str(d), vectors=str(vectors))
