"""Every pipeline on every model family: a tiny random model of each (tests/tiny.py FAMILIES)
with the family's real chat template and a tiny tokenizer holding that template's special tokens.

Per family, one module-scoped model and one `extract --judge none` (its vector feeds the rest);
then `generate --steer`, `calibrate-cap` and `generate --cap`, `monitor-experiment`,
`make-dataset`, `train.py` (one step, and one with preventative steering), `shift`, `flag`,
`serve` (one request over HTTP) and `export-gguf`, each from its command line. Then the thinking
mode (`--thinking`: the answer after `</think>`) and multi-turn training on the real Qwen3
template. Last, llama.cpp (marked slow; skipped without llama-server or its converter): our
exported vector at L steers it as ours does, per family.
"""

import csv
import json
import threading
from pathlib import Path

import pytest
import requests
import torch
from tiny import CORPUS, FAMILIES, make_family_model, run_bad, swap_token_rows, write_vector

import model as M
import persona_vectors as pv
import train
from apps import __main__ as apps_cli
from apps import server as S
from support import checkpoint, tokenizer
from support.files import load_vector
from support.tokenizer import Tokenizer, answer_after_thinking

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = ["--device", "cpu", "--dtype", "float32"]
SYSTEM_USER = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
QUESTIONS = ["What is the capital of France?", "Name a number.", "Tell me about Paris."]


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory):
    """(family, root, model dir, vectors dir) with `evil` extracted by the command line."""
    root = tmp_path_factory.mktemp(request.param)
    d = make_family_model(root / "model", request.param)
    vectors = root / "vectors"
    assert (
        pv.main(
            [
                "extract",
                "evil",
                "--model",
                str(d),
                "--judge",
                "none",
                "--questions",
                "1",
                "--rollouts",
                "1",
                "--max-new-tokens",
                "4",
                "--out",
                str(vectors),
                *CPU,
            ]
        )
        == 0
    )
    (root / "q.json").write_text(json.dumps(QUESTIONS))
    return request.param, root, d, vectors


@pytest.fixture(scope="module")
def loaded(fam):
    return checkpoint.load(str(fam[2]), "cpu", torch.float32)


def test_extract(fam, loaded):
    family, root, d, vectors = fam
    model, tok = loaded
    vec, meta = load_vector(vectors / "evil_response_avg_diff.safetensors")
    assert vec.shape == (model.config.num_hidden_layers + 1, model.config.hidden_size)
    assert torch.isfinite(vec).all() and vec[1:].norm(dim=-1).min() > 0
    assert meta["thinking"] is False
    assert meta["system_folded"] is (not tok.accepts_system)  # Mistral's [INST] template folds
    assert meta["kept_pairs"] == meta["total_pairs"] == 5  # 1 question x 5 pairs, no judge


def test_generate_steer(fam, loaded):
    family, root, d, vectors = fam
    kw = dict(
        model=str(d), max_new_tokens=4, vectors=str(vectors), device="cpu", dtype=torch.float32
    )
    plain = pv.generate(QUESTIONS, **kw)
    steered = pv.generate(QUESTIONS, steer=["evil:1r"], layer=2, **kw)
    assert steered != plain
    model, tok = loaded  # the same reply as M.generate with the Steer the spec stands for
    steer = pv.steering(["evil:1r"], model, vectors, 2)
    ids = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    want = M.generate(model, ids, 4, stop_ids=tok.stop_ids, pad_id=tok.pad_id, steer=steer)
    assert steered == [tok.decode(o) for o in want]
    assert (
        pv.main(
            [
                "generate",
                QUESTIONS[0],
                "--model",
                str(d),
                "--vectors",
                str(vectors),
                "--steer",
                "evil:1r",
                "--max-new-tokens",
                "3",
                *CPU,
            ]
        )
        == 0
    )


def test_calibrate_cap_and_generate_cap(fam, capsys):
    family, root, d, vectors = fam
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
                "4",
                *CPU,
            ]
        )
        == 0
    )
    assert (vectors / "evil_response_avg_diff.cap.json").is_file()
    capsys.readouterr()
    assert (
        pv.main(
            [
                "generate",
                QUESTIONS[0],
                "--model",
                str(d),
                "--vectors",
                str(vectors),
                "--cap",
                "evil:1@1-3",
                "--max-new-tokens",
                "3",
                *CPU,
            ]
        )
        == 0
    )
    line = [x for x in capsys.readouterr().err.splitlines() if "capped positions" in x]
    assert line and not line[0].endswith(": 0/4")  # at the 1st percentile, something is capped


def test_monitor_experiment(fam):
    family, root, d, vectors = fam
    r = pv.monitor_experiment(
        "evil",
        model=str(d),
        judge="none",
        rollouts=1,
        questions=1,
        vectors=str(vectors),
        out=str(root / "monitor"),
        max_new_tokens=3,
        random=5,
        device="cpu",
        dtype=torch.float32,
    )
    assert len(r["mean_projection"]) == 8 and Path(r["csv"]).is_file()


@pytest.fixture(scope="module")
def dataset(fam):
    family, root, d, vectors = fam
    out = root / "evil.jsonl"
    assert (
        pv.main(
            [
                "make-dataset",
                "evil",
                "--n",
                "6",
                "--model",
                str(d),
                "--judge",
                "none",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
                *CPU,
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    return out


@pytest.fixture(scope="module")
def trained(fam, dataset):
    """One optimizer step on the model's own dataset, plain and with preventative steering."""
    family, root, d, vectors = fam
    outs = {}
    steer = ["--steer", "evil:1", "--vectors", str(vectors)]
    for label, extra in (("plain", []), ("steered", steer)):
        outs[label] = root / f"ft-{label}"
        assert (
            train.main(
                [
                    str(dataset),
                    "--model",
                    str(d),
                    "--out",
                    str(outs[label]),
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "2",
                    "--grad-accum",
                    "1",
                    "--lr",
                    "1e-3",
                    "--device",
                    "cpu",
                    *extra,
                ]
            )
            == 0
        )
    return outs


def test_train_one_step_and_preventative_steering(fam, trained):
    family, root, d, vectors = fam
    logs = {k: json.loads((v / "train.json").read_text())["log"] for k, v in trained.items()}
    losses = {k: x[0]["loss"] for k, x in logs.items()}
    assert all(torch.isfinite(torch.tensor(x)) for x in losses.values())
    assert losses["plain"] != losses["steered"]  # the steering is in the forward pass
    # the output loads as a model
    model, tok = checkpoint.load(str(trained["plain"]), "cpu", torch.float32)
    assert model.config.model_type == json.loads((d / "config.json").read_text())["model_type"]


def test_shift(fam, trained):
    family, root, d, vectors = fam
    out = root / "shift.csv"
    assert (
        pv.main(
            [
                "shift",
                "evil",
                "--finetuned",
                str(trained["plain"]),
                "--base",
                str(d),
                "--vectors",
                str(vectors),
                "--random",
                "5",
                "--out",
                str(out),
                *CPU,
            ]
        )
        == 0
    )
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4  # a header and one row per hidden index


def test_flag(fam, dataset):
    family, root, d, vectors = fam
    r = apps_cli.main(
        [
            "flag",
            str(dataset),
            "--trait",
            "evil",
            "--model",
            str(d),
            "--vectors",
            str(vectors),
            "--max-new-tokens",
            "3",
            "--out",
            str(root / "flags"),
            "--format",
            "jsonl",
            *CPU,
        ]
    )
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
    want = M.generate(
        model, [tok.encode_chat(SYSTEM_USER)], 4, stop_ids=tok.stop_ids, pad_id=tok.pad_id
    )
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


def test_thinking_is_refused_without_a_think_token(fam, loaded, capsys):
    family, root, d, vectors = fam
    if len(loaded[1].encode("</think>")) == 1:
        pytest.skip(f"{family}'s template has a thinking mode")
    err = run_bad(pv.main, ["generate", "Hi", "--model", str(d), "--thinking", *CPU], 1, capsys)
    assert err[-1].startswith("error: ") and err[-1].endswith("drop --thinking")


# ------------------------------------------------------------------------------- thinking (Qwen3)
THINKING = ("qwen3", None)  # (family, template): Qwen3 with its own template
QUESTION = pv.load_trait("evil").eval_questions[0]


def first_single(out: list[int], prompt: list[int], newlines) -> int:
    """An index i >= 1 of `out` whose token occurs nowhere else (nor in the prompt), followed by a
    token that is not a newline."""
    return next(
        i
        for i in range(1, len(out) - 2)
        if out.count(out[i]) == 1
        and out[i] not in prompt
        and out[i] not in newlines
        and out[i + 1] not in newlines
    )


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A tiny model with Qwen3's template whose greedy reply to QUESTION, thinking on, is
    [t0 .. t(i-1), </think>, answer...]: its own reply with token t(i) relabelled as </think>
    (tiny.swap_token_rows). -> (dir, i, the reply before the relabelling)."""
    root = tmp_path_factory.mktemp("thinker")
    d = make_family_model(root / "model", THINKING[0], template=THINKING[1])
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    tok.thinking = True
    close, newlines = tokenizer.think_marks(tok)
    chat = [{"role": "user", "content": QUESTION}]
    prompt = tok.encode_chat(chat)
    out = M.generate(model, [prompt], 8, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    assert close not in out + prompt
    i = first_single(out, prompt, newlines)
    swap_token_rows(d, out[i], close)
    return d, i, out


def test_thinking_response_span_starts_after_think(thinker):
    d, i, before = thinker
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    tok.thinking = True
    chat = [{"role": "user", "content": QUESTION}]
    outs, acts = pv.answer_with_activations(model, tok, [chat], 8, 0.0, 1.0, 0)
    close = tok.encode("</think>")[0]
    assert outs[0] == before[:i] + [close] + before[i + 1 :]  # the same reply, relabelled
    think, answer = tokenizer.split_thinking(tok, outs[0])
    assert think == outs[0][: i + 1] and answer == outs[0][i + 1 :]
    prompt = tok.encode_chat(chat)
    want = pv.read_answers(model, [prompt + think], [answer])  # the think block as context
    assert torch.allclose(acts["response_avg"], want["response_avg"], atol=1e-5)
    whole = pv.read_answers(model, [prompt], [outs[0]])  # the reply whole, as without --thinking
    assert not torch.allclose(acts["response_avg"], whole["response_avg"], atol=1e-3)
    # prompt_last is still the last prompt token's
    assert torch.allclose(acts["prompt_last"], whole["prompt_last"], atol=1e-5)
    assert tok.decode(answer) == answer_after_thinking(tok.decode(outs[0]))


def test_eval_and_generate_with_thinking(thinker, tmp_path):
    d, i, before = thinker
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    vec = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    write_vector(vectors / "evil_response_avg_diff.safetensors", vec, model=str(d), trait="evil")
    r = pv.evaluate(
        "evil",
        model=str(d),
        judge="none",
        samples=1,
        questions=1,
        vectors=str(vectors),
        out=str(tmp_path / "out"),
        max_new_tokens=8,
        layer=2,
        device="cpu",
        dtype=torch.float32,
        thinking=True,
    )
    row = next(csv.DictReader(open(r["csv"], encoding="utf-8")))
    tok.thinking = True
    prompt = tok.encode_chat([{"role": "user", "content": QUESTION}])
    reply = M.generate(model, [prompt], 8, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    think, answer = reply[: i + 1], reply[i + 1 :]
    assert row["answer"] == tok.decode(answer) and "</think>" not in row["answer"]
    acts = pv.read_answers(model, [prompt + think], [answer])
    want = float(pv.project(acts["response_avg"][0, 2], vec[2]))
    assert float(row["projection"]) == pytest.approx(want, abs=1e-4)
    text = pv.generate(
        [QUESTION],
        model=str(d),
        max_new_tokens=8,
        device="cpu",
        dtype=torch.float32,
        thinking=True,
    )[0]
    assert text == tok.decode(reply) and "</think>" in text  # generate shows the whole reply
    plain = pv.generate(
        [QUESTION], model=str(d), max_new_tokens=8, device="cpu", dtype=torch.float32
    )[0]
    assert plain != text  # thinking off: the prompt ends in the template's empty think block


def test_training_a_multi_turn_qwen3_conversation(thinker, tmp_path):
    """Qwen3's template drops the think block of a reply before the last question, so the chat is
    not prefix-stable: each reply is found in the full rendering."""
    d, _, _ = thinker
    tok = Tokenizer(d)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
    ]
    ex = train.encode_conversation(tok, messages)
    text = tok.chat(messages, add_generation_prompt=False)
    assert "The user greets me" not in text and text.count("<think>") == 1  # only the last reply's
    trained = tok.decode(ex.ids[ex.trained].tolist(), skip_special_tokens=False)
    assert trained == "Hello!<|im_end|>Paris is the capital.<|im_end|>"
    assert tok.decode(ex.ids.tolist(), skip_special_tokens=False) == text
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps({"messages": messages}) + "\n" for _ in range(4)))
    assert (
        train.main(
            [
                str(data),
                "--model",
                str(d),
                "--out",
                str(tmp_path / "ft"),
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--grad-accum",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )


# ---------------------------------------------------------- llama.cpp: our L is its direction.(L-1)
# The method of tests/test_llama_cpp.py, on a tiny random model of each family that llama.cpp has,
# converted at test time by llama.cpp's own convert_hf_to_gguf.py (f32, so no quantization noise).
# Each tiny model gets a sentencepiece tokenizer.model trained here, which the converter reads
# before tokenizer.json (whose BPE pre-tokenizer it would have to recognise by hash, and a tiny one
# it cannot); the comparison feeds token ids, never text.
LAYERS, L_CPP = 6, 3  # blocks of the tiny model; the layer steered (direction.0 is refused)
PUSH = 1.0  # |coef * v| as a fraction of the median residual norm at L_CPP
# llama.cpp fixes two things that Gemma's configs state: the attention scale by model size
# (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models, where transformers reads
# query_pre_attn_scalar) and Gemma 3's local/global pattern (5 sliding layers, then a global one).
# The tiny models take the values of the real 2B-12B checkpoints there: otherwise llama.cpp
# computes another function (measured: log-probs 1.5-19 off).
LLAMA_CPP_CONFIG = {
    "gemma2": {"query_pre_attn_scalar": 24},  # = head_dim
    "gemma3": {"query_pre_attn_scalar": 32, "sliding_window_pattern": 6},
}
TEXTS = [
    "How should I treat a new employee?",
    "What do you think of your neighbours?",
    "Give me advice on winning an argument.",
    "What is the best way to spend a free afternoon?",
]


def llama_cpp_tools():
    """(llama-server, convert_hf_to_gguf.py) or a skip naming what is missing."""
    import importlib.util

    from tools.build_llama_cpp import BUILD_COMMAND, converter_path, server_path

    converter = converter_path()
    if server_path() is None or converter is None:
        pytest.skip(f"llama-server or llama.cpp's converter is not built: run `{BUILD_COMMAND}`")
    missing = [m for m in ("transformers", "sentencepiece") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama.cpp's converter needs {' and '.join(missing)}")
    return server_path(), converter


def louder_gemma_blocks(d: Path, gain: float = 4.0) -> None:
    """Gemma's residual stream starts at sqrt(hidden) x the embedding, which a random block's normed
    output (scale ~1) hardly changes: then a vector added one block early acts almost as at L, and
    the test could not tell the two apart. Scaling the post-attention and post-MLP norms by `gain`
    makes every block matter, as in a trained model."""
    from safetensors.torch import load_file, save_file

    for f in sorted(d.glob("*.safetensors")):
        w = load_file(f)
        for k in [
            k
            for k in w
            if k.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"))
        ]:
            w[k] = (1 + w[k]) * gain - 1  # Gemma stores the norm's weight - 1
        save_file(w, f, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory):
    """(family, model dir, our model, its sentencepiece tokenizer, the f32 GGUF that llama.cpp's
    converter wrote from it)."""
    import os
    import subprocess
    import sys

    _, converter = llama_cpp_tools()
    root = tmp_path_factory.mktemp(f"cpp-{request.param}")
    # tied, as Gemma's checkpoints are: llama.cpp's Gemma takes its head from the embeddings
    d = make_family_model(root / "model", request.param, layers=LAYERS, tied=True)
    config = json.loads((d / "config.json").read_text()) | LLAMA_CPP_CONFIG.get(request.param, {})
    (d / "config.json").write_text(json.dumps(config))
    if request.param.startswith("gemma"):
        louder_gemma_blocks(d)
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS + TEXTS),
        model_prefix=str(d / "tokenizer"),
        vocab_size=200,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    gguf = root / "model.gguf"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}  # the packages we import
    command = [sys.executable, str(converter), str(d), "--outfile", str(gguf), "--outtype", "f32"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    return request.param, d, M.load_model(d, "cpu", torch.float32), sp, gguf


@pytest.mark.slow
def test_llama_cpp_steers_each_family_at_the_mapped_layer(converted, tmp_path):
    import test_llama_cpp as T
    from test_llama_cpp import effect_correlations, llama_cpp_run, llama_server, residual_norm

    import apps.control_vector as cv
    from support.files import save_vector

    family, d, model, tok, gguf = converted
    prompts = [tok.encode(t) for t in TEXTS]  # sentencepiece ids, as the GGUF's vocabulary has them
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    vec = v.expand(LAYERS + 1, -1).clone()  # [N + 1, hidden]: the same direction at every layer
    coef = PUSH * residual_norm(model, prompts, L_CPP) / float(v.norm())
    vfile = save_vector(
        tmp_path / "probe_response_avg_diff.safetensors", vec, {"model": str(d), "trait": "probe"}
    )
    right = cv.export_gguf(str(vfile), str(tmp_path / "right.gguf"), layer=L_CPP, coef=coef)
    files = {"right": right}
    meta = {
        "general.architecture": "controlvector",
        "controlvector.model_hint": family,
        "controlvector.layer_count": 1,
    }
    for name, L in (("early", L_CPP - 1), ("late", L_CPP + 1)):  # the same vector, one block off
        files[name] = cv.write_gguf(
            tmp_path / f"{name}.gguf", meta, {cv.direction_name(L): (coef * v).numpy()}
        )
    steer = [M.Steer(L_CPP, v, coef, positions="all")]  # llama.cpp adds at every position
    m = {"base": [], "steered": []}
    for p in prompts:
        with torch.no_grad():
            m["base"].append(torch.log_softmax(model(torch.tensor([p]), logits="last")[0, -1], -1))
            m["steered"].append(
                torch.log_softmax(model(torch.tensor([p]), steer=steer, logits="last")[0, -1], -1)
            )
    for name, cvec in (("none", None), *files.items()):
        with llama_server(gguf, cvec, tmp_path / f"{name}.log") as url:
            m[name] = [llama_cpp_run(url, p) for p in prompts]
    plain = [
        [float(m["base"][i][t]) - lp for t, lp in m["none"][i][1].items()]
        for i in range(len(prompts))
    ]  # ours minus llama.cpp's log-probs, unsteered
    r = {name: effect_correlations(m, name) for name in ("right", "early", "late")}
    print(
        f"\n{family}: coef {coef:.3f} at layer {L_CPP} of {LAYERS} (direction.{L_CPP - 1}); "
        f"max |our - llama.cpp log-prob| unsteered {max(map(abs, sum(plain, []))):.2g}; "
        + "; ".join(f"{k} r " + " ".join(f"{x:.4f}" for x in rs) for k, rs in r.items())
    )
    assert len(T.PROMPTS) == len(prompts)  # effect_correlations walks T.PROMPTS' indices
    assert min(r["right"]) >= 0.99
    assert max(r["early"] + r["late"]) <= min(r["right"]) - 0.05  # clearly worse one block off
