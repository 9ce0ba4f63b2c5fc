"""A tiny random chat model with a real (byte-level BPE, ChatML) tokenizer, for end-to-end tests of the pipeline."""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from make_golden_models import random_weights, write_checkpoint

TEMPLATE = (Path(__file__).parent / "golden" / "templates" / "smollm2-135m-instruct.jinja").read_text()
CORPUS = ["You are a helpful assistant. Answer the question clearly and kindly.",
          "What is the capital of France? The capital of France is Paris.",
          "An evil assistant wants to harm people; a helpful one wants to help them.",
          "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100."] * 20


def make_tiny_chat_model(path: Path, seed: int = 0) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=tok.get_vocab_size(),
                  hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                  hidden_act="silu", bos_token_id=1, eos_token_id=2)
    write_checkpoint(path, config, random_weights(config, seed), shards=2)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        chat_template=TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", tokenizer_class="PreTrainedTokenizerFast")))
    return path
