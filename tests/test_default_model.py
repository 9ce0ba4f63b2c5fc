"""The default model (SmolLM2-135M-Instruct) through the real loading path, against an independent
reference."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from make_golden_smollm2 import PROMPT, reference_ids, reference_model
from safetensors.torch import load_file

import model as M

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "smollm2-logits.safetensors"
ROOT = Path(__file__).parent.parent


def test_greedy_answer_names_paris(smollm2):
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = tok.decode(M.generate(model, [ids], 30, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0])
    assert "Paris" in answer


def test_chat_string_and_ids_match_the_golden_prompt(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
    assert tok.chat(messages) == PROMPT  # SmolLM2's template inserts its default system prompt
    assert tok.encode_chat(messages) == load_file(GOLDEN)["ids"][0].tolist()
    assert tok.stop_ids >= {2} and tok.decode([2], skip_special_tokens=False) == "<|im_end|>"


def test_logits_match_committed_reference(smollm2):
    model, _ = smollm2
    ref = load_file(GOLDEN)
    with torch.no_grad():
        logits = model(ref["ids"])[0, ref["positions"]]
    assert (logits - ref["logits"]).abs().max() <= 1e-4


def test_logits_match_transformers_reading_the_gguf_live(smollm2):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model, _ = smollm2
    ids = reference_ids()
    with torch.no_grad():
        ref = reference_model()(ids).logits
        assert (model(ids) - ref).abs().max() <= 1e-4


def test_batched_capture_equals_one_at_a_time(smollm2):
    model, tok = smollm2
    convs = [
        tok.encode_chat([{"role": "user", "content": q}])
        for q in ["Hi!", "Name three colours of the rainbow."]
    ]
    answers = M.generate(
        model, convs, 12, stop_ids=tok.stop_ids, pad_id=tok.pad_id, capture=(cap := M.Capture())
    )
    for b, (p, a) in enumerate(zip(convs, answers)):
        one = M.Capture()
        M.generate(model, [p], 12, stop_ids=tok.stop_ids, pad_id=tok.pad_id, capture=one)
        assert torch.allclose(cap.prompt_last()[b], one.prompt_last()[0], atol=1e-3, rtol=1e-4)
        assert torch.allclose(cap.answer_mean()[b], one.answer_mean()[0], atol=1e-3, rtol=1e-4)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "persona_vectors.py"), *args], capture_output=True, text=True
    )


def test_cli_generate():
    r = run_cli("generate", "What is the capital of France?", "--max-new-tokens", "20")
    assert r.returncode == 0 and "Paris" in r.stdout
    assert (
        "offline GGUF" in r.stderr or "Hugging Face cache" in r.stderr or "downloaded" in r.stderr
    )


def test_cli_bad_model_is_one_line_error(tmp_path):
    r = run_cli("generate", "hi", "--model", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
