"""Every pipeline on every model family: a tiny random model of each (tests/tiny.py FAMILIES) with the
family's real chat template and a tiny tokenizer holding that template's special tokens.

Per family, one module-scoped model and one `extract --judge none` (its vector feeds the rest); then
`generate --steer`, `calibrate-cap` and `generate --cap`, `monitor-experiment`, `make-dataset`,
`train.py` (one step, and one with preventative steering), `shift`, `flag`, `serve` (one request over
HTTP) and `export-gguf`, each from its command line. Then the thinking mode (`--thinking`: the answer
after `</think>`) and multi-turn training on the real Qwen3 template.
"""
import json
import threading
from pathlib import Path

import pytest
import requests
import torch

import model as M
import persona_vectors as pv
import train
from apps import __main__ as apps_cli
from apps import server as S
from support import generation as G
from support.files import load_vector
from support.tokenizer import Tokenizer
from tiny import FAMILIES, make_family_model, run_bad

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = ["--device", "cpu", "--dtype", "float32"]
SYSTEM_USER = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "What is the capital of France?"}]
QUESTIONS = ["What is the capital of France?", "Name a number.", "Tell me about Paris."]


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory):
    """(family, root, model dir, vectors dir) with `evil` extracted by the command line."""
    root = tmp_path_factory.mktemp(request.param)
    d = make_family_model(root / "model", request.param)
    vectors = root / "vectors"
    assert pv.main(["extract", "evil", "--model", str(d), "--judge", "none", "--questions", "1",
                    "--rollouts", "1", "--max-new-tokens", "4", "--out", str(vectors), *CPU]) == 0
    (root / "q.json").write_text(json.dumps(QUESTIONS))
    return request.param, root, d, vectors


@pytest.fixture(scope="module")
def loaded(fam):
    return M.load(str(fam[2]), "cpu", torch.float32)


def test_extract(fam, loaded):
    family, root, d, vectors = fam
    model, tok = loaded
    vec, meta = load_vector(vectors / "evil_response_avg_diff.safetensors")
    assert vec.shape == (model.config.num_hidden_layers + 1, model.config.hidden_size)
    assert torch.isfinite(vec).all() and vec[1:].norm(dim=-1).min() > 0
    assert meta["thinking"] is False
    assert meta["system_folded"] is (not tok.accepts_system)  # Mistral's [INST] template folds
    assert meta["kept_pairs"] == meta["total_pairs"] == 5  # 1 question x 5 instruction pairs, no judge


def test_generate_steer(fam, loaded):
    family, root, d, vectors = fam
    kw = dict(model_name=str(d), max_new_tokens=4, vectors=str(vectors), device="cpu",
              dtype=torch.float32)
    plain = pv.generate(QUESTIONS, **kw)
    steered = pv.generate(QUESTIONS, steer=["evil:1r"], layer=2, **kw)
    assert steered != plain
    model, tok = loaded  # the same reply as G.generate with the Steer the spec stands for
    steer = pv.steering(["evil:1r"], model, vectors, 2)
    ids = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    want = G.generate(model, ids, 4, stop_ids=tok.stop_ids, pad_id=tok.pad_id, steer=steer)
    assert steered == [tok.decode(o) for o in want]
    assert pv.main(["generate", QUESTIONS[0], "--model", str(d), "--vectors", str(vectors),
                    "--steer", "evil:1r", "--max-new-tokens", "3", *CPU]) == 0


def test_calibrate_cap_and_generate_cap(fam, capsys):
    family, root, d, vectors = fam
    assert apps_cli.main(["calibrate-cap", "evil", "--model", str(d), "--vectors", str(vectors),
                          "--questions-file", str(root / "q.json"), "--n", "3",
                          "--max-new-tokens", "4", *CPU]) == 0
    assert (vectors / "evil_response_avg_diff.cap.json").is_file()
    capsys.readouterr()
    assert pv.main(["generate", QUESTIONS[0], "--model", str(d), "--vectors", str(vectors),
                    "--cap", "evil:1@1-3", "--max-new-tokens", "3", *CPU]) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if "capped positions" in x]
    assert line and not line[0].endswith(": 0/4")  # at the 1st percentile, something is capped


def test_monitor_experiment(fam):
    family, root, d, vectors = fam
    r = pv.monitor_experiment("evil", model_name=str(d), judge="none", rollouts=1, questions=1,
                              vectors=str(vectors), out=str(root / "monitor"), max_new_tokens=3,
                              n_random=5, device="cpu", dtype=torch.float32)
    assert len(r["mean_projection"]) == 8 and Path(r["csv"]).is_file()


@pytest.fixture(scope="module")
def dataset(fam):
    family, root, d, vectors = fam
    out = root / "evil.jsonl"
    assert pv.main(["make-dataset", "evil", "--n", "4", "--model", str(d), "--judge", "none",
                    "--max-new-tokens", "4", "--out", str(out), *CPU]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    return out


@pytest.fixture(scope="module")
def trained(fam, dataset):
    """One optimizer step on the model's own dataset, plain and with preventative steering."""
    family, root, d, vectors = fam
    outs = {}
    for label, extra in (("plain", []), ("steered", ["--steer", "evil:1", "--vectors", str(vectors)])):
        outs[label] = root / f"ft-{label}"
        assert train.main([str(dataset), "--model", str(d), "--out", str(outs[label]), "--max-steps",
                           "1", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3",
                           "--device", "cpu", *extra]) == 0
    return outs


def test_train_one_step_and_preventative_steering(fam, trained):
    family, root, d, vectors = fam
    logs = {k: json.loads((v / "train.json").read_text())["log"] for k, v in trained.items()}
    assert all(len(x) >= 1 and all(map(torch.isfinite, torch.tensor([x[0]["loss"]]))) for x in logs.values())
    assert logs["plain"][0]["loss"] != logs["steered"][0]["loss"]  # the steering is in the forward pass
    model, tok = M.load(str(trained["plain"]), "cpu", torch.float32)  # the output loads as a model
    assert model.config.model_type == json.loads((d / "config.json").read_text())["model_type"]


def test_shift(fam, trained):
    family, root, d, vectors = fam
    out = root / "shift.csv"
    assert pv.main(["shift", "evil", "--finetuned", str(trained["plain"]), "--base", str(d),
                    "--vectors", str(vectors), "--random", "5", "--out", str(out), *CPU]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4  # a header and one row per hidden index


def test_flag(fam, dataset):
    family, root, d, vectors = fam
    r = apps_cli.main(["flag", str(dataset), "--trait", "evil", "--model", str(d), "--vectors",
                       str(vectors), "--max-new-tokens", "3", "--out", str(root / "flags"),
                       "--format", "jsonl", *CPU])
    assert r == 0
    rows = [json.loads(x) for x in (root / "flags" / "evil.flag.jsonl").read_text().splitlines()]
    n = len(dataset.read_text().splitlines())
    assert len(rows) == n and all(isinstance(x["evil_delta_p"], float) for x in rows)


def test_serve_one_request(fam, loaded):
    family, root, d, vectors = fam
    model, tok = loaded
    engine = S.Engine(model, tok, vectors, max_batch=4, max_n=1, batch_wait=0.01)
    server = S.make_server(engine, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        body = {"messages": SYSTEM_USER, "max_tokens": 4, "temperature": 0}
        got = requests.post(url, json=body, timeout=60).json()["choices"][0]["message"]["content"]
    finally:
        server.shutdown()
        server.server_close()
        engine.close()
    want = G.generate(model, [tok.encode_chat(SYSTEM_USER)], 4, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    assert got == tok.decode(want[0])


def test_export_gguf(fam, loaded):
    gguf = pytest.importorskip("gguf")
    family, root, d, vectors = fam
    path, out = vectors / "evil_response_avg_diff.safetensors", root / "evil.gguf"
    assert apps_cli.main(["export-gguf", str(path), "--layer", "2", "--out", str(out)]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    vec, _ = load_vector(path)
    assert list(tensors) == ["direction.1"]  # our layer L is llama.cpp's direction.(L-1)
    assert torch.allclose(torch.tensor(tensors["direction.1"].data).flatten(), vec[2], atol=1e-6)
