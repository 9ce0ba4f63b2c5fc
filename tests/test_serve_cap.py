"""Persona capping in `serve` (the request field `cap`, the choice's `capped_tokens`) on a tiny
random model: each capped, steered or plain row of one batch gives what model.generate gives on it
alone, with caps_for."""

import json
import shutil

import pytest
import requests
import torch
from test_server import HI, NUMBERS, TIMEOUT, start, stop
from tiny import tiny_model_with_vectors

import model as M
import persona_vectors as pv
from apps import __main__ as apps_cli
from apps import server as S
from support import checkpoint
from support.capping import PERCENTILES, caps_for, ceiling_path, vector_sha256, write_ceilings
from support.files import load_vector

HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model; evil calibrated by calibrate-cap; humorous with a made-up ceiling file whose
    percentiles below 50 sit far below every state (such a cap moves every position) and from 50 on
    far above (it moves none); plain with no ceiling file."""
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("serve_cap"))
    root = d.parent
    (root / "q.json").write_text(
        json.dumps(["What is the capital of France?", "How are you?", "Help me, please."])
    )
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
                "3",
                "--max-new-tokens",
                "6",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    humorous = vectors / "humorous_response_avg_diff.safetensors"
    write_ceilings(
        ceiling_path(humorous),
        dict(
            model=str(d),
            vector_sha256=vector_sha256(load_vector(humorous)[0]),
            percentiles=PERCENTILES,
            ceilings=[[-1e4 if p < 50 else 1e4] * 4 for p in PERCENTILES],
        ),
    )
    shutil.copy(humorous, vectors / "plain_response_avg_diff.safetensors")
    evil = vectors / "evil_response_avg_diff.safetensors"
    calibrated = json.loads(ceiling_path(evil).read_text())
    for name, drop in [("nosha", "vector_sha256"), ("shortgrid", None)]:  # evil's, damaged by hand
        shutil.copy(evil, vectors / f"{name}_response_avg_diff.safetensors")
        c = {k: v for k, v in calibrated.items() if k != drop}
        c["percentiles"] = c["percentiles"][:-1] if drop is None else c["percentiles"]
        (vectors / f"{name}_response_avg_diff.cap.json").write_text(json.dumps(c))
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    return d, vectors, model, tok


@pytest.fixture(scope="module")
def srv(tiny):
    url, engine, server = start(tiny)
    yield url, engine
    stop(engine, server)


def alone(tiny, messages, max_tokens, caps=(), steer=()) -> tuple[list[int], dict]:
    """M.generate alone, greedy, with caps_for(caps) and --steer specs -> (reply tokens,
    {trait: cap.fired})."""
    d, vectors, model, tok = tiny
    capped = [caps_for([spec], model, vectors)[0] for spec in caps]
    out = M.generate(
        model,
        [tok.encode_chat(messages)],
        max_tokens,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        steer=pv.steering(list(steer), model, vectors),
        cap=capped,
    )[0]
    return out, {spec.split(":")[0]: int(c.fired[0]) for spec, c in zip(caps, capped)}


def test_a_capped_request_equals_generate_alone(tiny, srv):
    url, engine = srv
    tok = tiny[3]
    plain, _ = alone(tiny, HI, 12)
    changed = []
    for cap, specs in [
        ({"evil": 50}, ["evil:50.0"]),
        ({"evil": {"percentile": 20, "layers": [1, 3]}}, ["evil:20@1,3"]),
        ({"humorous": {"percentile": 10, "layers": "2-3"}}, ["humorous:10@2-3"]),
    ]:
        r = requests.post(
            f"{url}/chat/completions",
            json={"messages": HI, "max_tokens": 12, "temperature": 0, "cap": cap},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        out, fired = alone(tiny, HI, 12, specs)
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == tok.decode(out)
        assert choice["capped_tokens"] == fired and min(fired.values()) > 0
        changed.append(out != plain)
    assert changed[-1]  # a cap that moves every position changes the reply
    r = requests.post(
        f"{url}/chat/completions",
        json={
            "messages": HI,
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "cap": {"humorous": 99},
        },
        timeout=TIMEOUT,
    )
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["capped_tokens"] == {"humorous": 0}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == tok.decode(plain)


def test_one_batch_of_capped_steered_and_plain_rows_equals_each_alone(tiny, srv):
    """Rows with different caps (and steering) and lengths in one batch: each as alone, and its own
    cap count, while rows leave the batch (and their ceilings and counts with them)."""
    url, engine = srv
    tok = tiny[3]
    cases = [
        (HI, {"cap": {"humorous": 10}}, ["humorous:10"], []),  # every position above its ceiling
        (NUMBERS, {}, [], []),
        (HI, {"cap": {"evil": 50}, "steer": {"evil": 3}}, ["evil:50"], ["evil:3.0"]),
        (HELLO, {"steer": {"humorous": -2}}, [], ["humorous:-2.0"]),
        (
            NUMBERS,
            {"cap": {"humorous": 99, "evil": {"percentile": 30, "layers": "1-2"}}},
            ["evil:30@1-2", "humorous:99"],
            [],
        ),
        (HELLO, {"cap": {"humorous": 99}}, ["humorous:99"], []),
    ]  # no position above its ceiling
    jobs = [
        S.Job(engine.parse({"messages": m, "max_tokens": 3 + 2 * i, "temperature": 0} | extra))
        for i, (m, extra, *_) in enumerate(cases)
    ]
    # one batch, here, not on the worker
    engine.generate([S.Row(j, 0, j.req.steer, "cpu") for j in jobs])
    counts = []
    for i, (job, (messages, extra, caps, steer)) in enumerate(zip(jobs, cases)):
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        out, fired = alone(tiny, messages, 3 + 2 * i, caps, steer)
        assert "".join(e[2]["text"] for e in events if e[0] == "delta") == tok.decode(out), i
        assert events[-1][0] == "finish" and events[-1][2]["capped_tokens"] == fired, i
        counts.append((len(out), events[-1][2]["capped_tokens"]))
    # the last prompt token and every reply token: all moved
    assert counts[0] == (3, {"humorous": 4})
    assert counts[-1][1] == {"humorous": 0} and counts[4][1]["humorous"] == 0 and counts[1][1] == {}


def test_a_capped_reply_is_gauged_as_the_plain_model_reads_it(tiny, srv):
    url, engine = srv
    d, vectors, model, tok = tiny
    r = requests.post(
        f"{url}/chat/completions",
        json={"messages": HI, "max_tokens": 6, "temperature": 0, "cap": {"humorous": 10}},
        timeout=TIMEOUT,
    ).json()
    out, _ = alone(tiny, HI, 6, ["humorous:10"])
    g = next(g for g in engine.gauges if g.trait == "humorous")
    ids, cap = tok.encode_chat(HI), M.Capture()
    with torch.no_grad():  # no cap in this pass: the plain model reads prompt + reply
        model(
            torch.tensor([ids + out]),
            answer_start=torch.tensor([len(ids)]),
            capture=cap,
            logits="none",
        )
    reply = float(cap.answer_mean()[0, g.layer] @ g.unit)
    assert r["choices"][0]["persona"]["humorous"]["reply"] == pytest.approx(reply, abs=1e-4)


BAD = [
    ({"cap": {"greedy": 90}}, 'cap: unknown vector "greedy"'),
    ({"cap": {"../../evil_response_avg_diff.safetensors": 90}}, "unknown vector"),
    ({"cap": {"evil": 100}}, "cap.evil: the percentile must be a number in (0, 100)"),
    ({"cap": {"evil": 0}}, "the percentile must be a number in (0, 100)"),
    ({"cap": {"evil": "high"}}, "the percentile must be a number in (0, 100)"),
    ({"cap": {"evil": 0.5}}, "percentile 0.5 is outside the calibrated 1..99.9"),
    (
        {"cap": {"evil": {"percentile": 90, "layers": "9"}}},
        "layer 9 out of range: this model has blocks 1..3",
    ),
    ({"cap": {"evil": {"layers": [0, 1]}}}, "layer 0 out of range"),
    ({"cap": {"evil": {"layers": "middle"}}}, "layers must be like 16, 16-19"),
    ({"cap": {"evil": {"layers": 2}}}, "cap.evil.layers must be like"),
    (
        {"cap": {"evil": {"ceiling": 3}}},
        "cap.evil must be a percentile or an object with keys percentile, layers",
    ),
    ({"cap": {"plain": 90}}, "no cap ceilings"),
    ({"cap": {"plain": 90}}, "run: python -m apps calibrate-cap plain"),
    ({"cap": "evil:90"}, "cap must be an object"),
    ({"cap": {"evil": {"layers": "1-5000000"}}}, "layer 5000000 out of range: this model has"),
    ({"cap": {"evil": {"layers": "1,3-1"}}}, "layers must be like 16, 16-19"),
    (
        {"cap": {"nosha": 90}},
        "nosha_response_avg_diff.cap.json: no `vector_sha256` (a string); "
        "recalibrate: python -m apps calibrate-cap nosha --force",
    ),
    ({"cap": {"shortgrid": 90}}, "`ceilings` must be 100 rows (one per percentile)"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_cap_is_a_one_line_400(tiny, srv, body, message):
    url, engine = srv
    r = requests.post(
        f"{url}/chat/completions", json={"messages": HI, "max_tokens": 2} | body, timeout=TIMEOUT
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"] and error["param"] == "cap"
    assert "--cap" not in error["message"]


def test_a_huge_layer_range_is_refused_before_it_is_expanded(tiny, srv):
    """The request's layers are checked against the model's blocks before any range is expanded:
    "1-5000000" costs what "1-3" does (it cost 0.5 GB and seconds before its 400)."""
    import tracemalloc

    url, engine = srv
    tracemalloc.start()
    try:
        with pytest.raises(S.RequestError, match="layer 5000000 out of range"):
            engine.parse({"messages": HI, "cap": {"evil": {"layers": "1-5000000"}}})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak  # bytes


def test_a_ceiling_file_is_read_once_per_trait(tiny, srv, monkeypatch):
    url, engine = srv
    import support.capping as C

    ask = {"messages": HI, "max_tokens": 2, "cap": {"evil": 90}}
    assert requests.post(f"{url}/chat/completions", json=ask, timeout=TIMEOUT).status_code == 200
    read = []
    # returns None: a read again would fail
    monkeypatch.setattr(C, "calibrated", lambda *a: read.append(a))
    for p in (80, 95):
        r = requests.post(
            f"{url}/chat/completions", json=ask | {"cap": {"evil": p}}, timeout=TIMEOUT
        )
        assert r.status_code == 200, r.text
    assert read == []
