"""A tiny random chat model with a real (byte-level BPE, ChatML) tokenizer, for end-to-end tests of
the pipeline."""

import hashlib
import json
from pathlib import Path

import torch
from make_golden_models import CONFIGS, random_weights, write_checkpoint
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEMPLATE = (
    Path(__file__).parent / "golden" / "templates" / "smollm2-135m-instruct.jinja"
).read_text()
CORPUS = [
    "You are a helpful assistant. Answer the question clearly and kindly.",
    "What is the capital of France? The capital of France is Paris.",
    "An evil assistant wants to harm people; a helpful one wants to help them.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.",
] * 20


def make_tiny_chat_model(path: Path, seed: int = 0) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )
    write_checkpoint(path, config, random_weights(config, seed), shards=2)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                chat_template=TEMPLATE,
                bos_token="<|im_start|>",
                eos_token="<|im_end|>",
                pad_token="<|im_end|>",
                unk_token="<|endoftext|>",
                tokenizer_class="PreTrainedTokenizerFast",
            )
        )
    )
    return path


def tiny_model_with_vectors(root: Path) -> tuple[Path, Path]:
    """The tiny model and a vectors directory with random `evil` and `humorous` vectors, with gauge
    marks."""
    d = make_tiny_chat_model(root / "model")
    vectors = root / "vectors"
    vectors.mkdir()
    for trait, seed in (("evil", 0), ("humorous", 1)):
        write_vector(
            vectors / f"{trait}_response_avg_diff.safetensors",
            torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)),
            model=str(d),
            trait=trait,
            pos_prompt_last_projection=[1.0] * 4,
            neg_prompt_last_projection=[-1.0] * 4,
            pos_response_avg_projection=[2.0] * 4,
            neg_response_avg_projection=[-2.0] * 4,
        )
    return d, vectors


def write_vector(path: Path, vec: torch.Tensor, **meta) -> Path:
    """A vector file as `extract` writes it (tensor `vector`, JSON metadata), with a residual norm
    of 10 + layer."""
    meta = {"model": "tiny", "residual_norm": [float(10 + i) for i in range(vec.shape[0])]} | meta
    save_file({"vector": vec}, path, metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


class FakeJudge:
    """A stand-in judge: the same score for every prompt, or (value=None) a hash of the prompt
    0-100; counts asks."""

    def __init__(self, name: str = "fake:hash", value: float | None = None, hashed: bool = False):
        self.name, self.value, self.hashed, self.asked = name, value, hashed, 0

    def score(self, prompts, on_result=None):
        self.asked += len(prompts)
        out = [
            float(int(hashlib.sha256(p.encode()).hexdigest(), 16) % 101)
            if self.hashed
            else self.value
            for p in prompts
        ]
        for i, s in enumerate(out):
            if on_result:
                on_result(i, s)
        return out


def tree(root) -> dict:
    """Every path under `root`, folders included -> the sha256 of its bytes (None for a folder):
    before == after means nothing was written, changed or left behind."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
    }


def main_of(args: list[str]):
    """The main that takes this command line: `python -m apps` for the applications' commands
    (chat, serve, ...), else persona_vectors.py's."""
    import persona_vectors as pv
    from apps import __main__ as apps_cli

    return apps_cli.main if args[0] in pv.APP_COMMANDS else pv.main


def run_bad(main, args: list[str], code: int, capsys) -> list[str]:
    """Run a command line that must fail with exit `code` (2: argparse's SystemExit) -> its stderr
    lines, checked to hold no traceback."""
    import pytest

    if code == 2:
        with pytest.raises(SystemExit) as e:
            main(args)
        got = e.value.code
    else:
        got = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code, err
    assert "Traceback" not in "\n".join(err)
    return err


# ------------------------------------------------------------------------------ model families
TEMPLATES = Path(__file__).parent / "golden" / "templates"
SOURCES = json.loads((TEMPLATES / "SOURCES.json").read_text(encoding="utf-8"))


def _arch(golden: str) -> dict:
    """The architecture of a golden tiny checkpoint's config (tests/make_golden_models.py): its
    family's features (norms, soft-caps, windows, RoPE), without its vocabulary, depth and ids."""
    drop = (
        "vocab_size",
        "num_hidden_layers",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    return {k: v for k, v in CONFIGS[golden].items() if k not in drop}


# family -> (the config keys that make it, the real chat template its tiny model carries). Adding a
# family to tests/test_family_pipelines.py is one line here.
FAMILIES = {
    "llama": (
        dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0),
        "llama-3.1-8b-instruct",
    ),
    "qwen2": (
        dict(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            rope_theta=1000000.0,
            use_sliding_window=False,
        ),
        "qwen2.5-7b-instruct",
    ),
    "mistral": (
        dict(
            architectures=["MistralForCausalLM"],
            model_type="mistral",
            rope_theta=1000000.0,
            sliding_window=None,
        ),
        "mistral-7b-instruct-v0.3",
    ),
    "qwen3": (_arch("tiny-qwen3"), "qwen3-0.6b"),
    "gemma2": (_arch("tiny-gemma2"), "gemma-2-2b-it"),
    "gemma3": (_arch("tiny-gemma3"), "gemma-3-it"),
}


def family_tokenizer(name: str):
    """A tiny byte-level BPE tokenizer with the control tokens of template `name` (SOURCES.json) as
    special tokens, its plain added tokens (Qwen3's <think>, </think>) as added ones."""
    from tokenizers import AddedToken

    src = SOURCES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=list(src["control_tokens"]),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in src.get("plain_added_tokens", ())]
    )
    return tok


def make_family_model(
    path: Path,
    family: str,
    seed: int = 0,
    template: str | None = None,
    layers: int = 3,
    tied: bool = False,
) -> Path:
    """A tiny random model of `family` (FAMILIES) with its real chat template (or `template`, a
    SOURCES.json name), a tiny tokenizer holding that template's special tokens, and the model's
    own special-token settings and generation eos ids. Untied unless `tied`: a random tied head
    mostly repeats its input token (Gemma's embeddings, scaled by sqrt(hidden), dominate the
    residual), and all-whitespace replies test little."""
    arch, default_template = FAMILIES[family]
    name = template or default_template
    src = SOURCES[name]
    tok = family_tokenizer(name)
    ids = {t: tok.token_to_id(t) for t in src["control_tokens"]}
    special = {k: v for k, v in src["special_tokens"].items() if v is not None}
    config = (
        dict(
            vocab_size=tok.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            hidden_act="silu",
            bos_token_id=ids.get(special.get("bos_token")),
            eos_token_id=ids.get(special["eos_token"]),
        )
        | arch
    )
    config["tie_word_embeddings"] = tied
    write_checkpoint(path, config, random_weights(config, seed), shards=2)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                chat_template=(TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"),
                tokenizer_class="PreTrainedTokenizerFast",
                **special,
            )
        )
    )
    eos = [tok.token_to_id(t) for t in src["generation_eos"]]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path


def swap_token_rows(model_dir: Path, a: int, b: int) -> None:
    """Relabel token ids a and b in a checkpoint: their rows of the embedding and the LM head trade
    places, so the model computes the same function with the two ids swapped (e.g. to make a random
    model write `</think>` where it wrote another token)."""
    from safetensors.torch import load_file

    for f in sorted(model_dir.glob("*.safetensors")):
        weights = load_file(f)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in weights:
                weights[name][[a, b]] = weights[name][[b, a]]
        save_file(weights, f, metadata={"format": "pt"})
