"""tokenizer.py: chat rendering against the real templates (golden file + live transformers), encoding, special ids.

Each model directory here is a tiny stand-in built in tmp: a byte-level BPE tokenizer.json trained on a few sentences
whose special tokens are the family's control tokens, and a tokenizer_config.json carrying the model's real chat
template (tests/golden/templates/). Regenerate the golden strings with tests/make_golden_chat.py.
"""
import json
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import support.tokenizer as tokenizer_module
from support.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "golden"
SOURCES = json.loads((GOLDEN / "templates" / "SOURCES.json").read_text(encoding="utf-8"))
NAMES = sorted(k for k in SOURCES if not k.startswith("_"))
CHAT_GOLDEN = json.loads((GOLDEN / "chat_golden.json").read_text(encoding="utf-8"))
CORPUS = ["What is the capital of France? Paris is the capital of France.", "Hello! How can I help you today?",
          "You are a helpful assistant. Tell me a joke.", "Line one.\nLine two.\n\nLine four.", "Ça va? 日本語 🙂"]


def template_text(name):
    return (GOLDEN / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def build_tokenizer_json(control_tokens, bos_post_processor=None) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(control_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos_post_processor:  # like Llama-3's tokenizer.json, which adds BOS unless add_special_tokens=False
        bos_id = tok.token_to_id(bos_post_processor)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_post_processor} $A", pair=f"{bos_post_processor} $A {bos_post_processor} $B",
            special_tokens=[(bos_post_processor, bos_id)])
    return tok


def make_model_dir(path: Path, name: str, *, template="real", gen_eos="list", config_overrides=None) -> Path:
    """A tiny Hugging Face-layout tokenizer directory standing in for model `name` of SOURCES.json."""
    src = SOURCES[name]
    path.mkdir(parents=True, exist_ok=True)
    special = src["special_tokens"]
    tok = build_tokenizer_json(src["control_tokens"], special["bos_token"] if src["family"] == "llama3" else None)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              **{k: v for k, v in special.items() if v is not None}}
    if template == "real":
        config["chat_template"] = template_text(name)
    config.update(config_overrides or {})
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    eos_ids = [tok.token_to_id(t) for t in src["generation_eos"]]
    if gen_eos:
        gen = {"eos_token_id": eos_ids if gen_eos == "list" else eos_ids[0]}
        (path / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {name: make_model_dir(root / name, name) for name in NAMES}


def pin_clock(monkeypatch, iso: str):
    frozen = datetime.fromisoformat(iso)
    monkeypatch.setattr(tokenizer_module, "_strftime_now", lambda fmt: frozen.strftime(fmt))


# ------------------------------------------------------------------------------------------------ golden strings
def test_golden_file_covers_every_template():
    assert sorted(CHAT_GOLDEN) == NAMES
    for name in NAMES:
        cases = CHAT_GOLDEN[name]
        assert {c["add_generation_prompt"] for c in cases} == {True, False}
        assert len(cases) >= 20


@pytest.mark.parametrize("name", NAMES)
def test_chat_matches_golden(name, model_dirs, monkeypatch):
    tok = Tokenizer(model_dirs[name])
    for case in CHAT_GOLDEN[name]:
        if "frozen_now" in case:
            pin_clock(monkeypatch, case["frozen_now"])
        got = tok.chat(case["messages"], case["add_generation_prompt"], **case.get("kwargs", {}))
        assert got == case["text"], f"{name} / {case['name']} / add_generation_prompt={case['add_generation_prompt']}"
        ids = tok.encode_chat(case["messages"], case["add_generation_prompt"], **case.get("kwargs", {}))
        assert ids == tok.encode(case["text"])
        if tok.bos_id is not None and tok.family == "llama3":
            assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


EXPECTED = {
    "qwen2.5-7b-instruct": ("chatml", "chatml", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen2-7b-instruct": ("chatml", "chatml", "You are a helpful assistant."),
    "smollm2-135m-instruct": ("chatml", "chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "llama-3-8b-instruct": ("llama3", "llama3.0", None),
    "llama-3.1-8b-instruct": ("llama3", "llama3.1", None),
    "llama-3.2-3b-instruct": ("llama3", "llama3.1", None),
}


@pytest.mark.parametrize("name", NAMES)
def test_family_and_default_system_read_from_template(name, model_dirs):
    tok = Tokenizer(model_dirs[name])
    assert (tok.family, tok.variant, tok.default_system_prompt) == EXPECTED[name]


def test_llama32_uses_todays_date_and_date_string_overrides(model_dirs, monkeypatch):
    tok = Tokenizer(model_dirs["llama-3.2-3b-instruct"])
    pin_clock(monkeypatch, "2031-12-05T08:00:00")
    msgs = [{"role": "user", "content": "Hi"}]
    assert "Today Date: 05 Dec 2031\n\n" in tok.chat(msgs)
    assert "Today Date: 1 May 2020\n\n" in tok.chat(msgs, date_string="1 May 2020")
    # Llama-3.1's template has a fixed default and ignores the clock
    assert "Today Date: 26 Jul 2024\n\n" in Tokenizer(model_dirs["llama-3.1-8b-instruct"]).chat(msgs)


# ------------------------------------------------------------------------------------- live transformers parity
@pytest.mark.parametrize("name", NAMES)
def test_chat_matches_live_transformers(name, model_dirs, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from transformers.utils import chat_template_utils

    frozen = datetime(2030, 10, 2, 9, 30)

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)
    pin_clock(monkeypatch, frozen.isoformat())
    ref = transformers.AutoTokenizer.from_pretrained(str(model_dirs[name]))
    ours = Tokenizer(model_dirs[name])
    for case in CHAT_GOLDEN[name]:
        msgs, agp, kwargs = case["messages"], case["add_generation_prompt"], case.get("kwargs", {})
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp, **kwargs)
        assert ours.chat(msgs, agp, **kwargs) == want, f"{name} / {case['name']}"
        want_ids = ref.apply_chat_template(msgs, tokenize=True, return_dict=False, add_generation_prompt=agp, **kwargs)
        assert ours.encode_chat(msgs, agp, **kwargs) == list(want_ids)


# ------------------------------------------------------------------------------------------- encode / decode
def test_encode_never_duplicates_bos(model_dirs):
    tok = Tokenizer(model_dirs["llama-3.1-8b-instruct"])
    bos = tok.bos_id
    assert bos == tok._tok.token_to_id("<|begin_of_text|>")
    assert tok._tok.encode("Hello").ids[0] == bos  # the raw post-processor would add one ...
    assert bos not in tok.encode("Hello")           # ... but encode adds nothing implicitly
    assert tok.encode("Hello", add_bos=True) == [bos] + tok.encode("Hello")
    assert tok.encode("<|begin_of_text|>Hello", add_bos=True) == [bos] + tok.encode("Hello")
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[0] == bos and ids.count(bos) == 1


def test_encode_recognises_special_tokens_and_decodes(model_dirs):
    tok = Tokenizer(model_dirs["qwen2.5-7b-instruct"])
    im_start, im_end = tok._tok.token_to_id("<|im_start|>"), tok._tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHello<|im_end|>"
    assert tok.decode(ids) == "user\nHello"
    assert tok.bos_id is None and tok.encode("Hello", add_bos=True) == tok.encode("Hello")  # Qwen has no BOS
    text = "Ça va? 日本語 🙂 — new\nline"
    assert tok.decode(tok.encode(text)) == text
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(tok.encode(text))) == text


def test_vocab_size(model_dirs):
    tok = Tokenizer(model_dirs["smollm2-135m-instruct"])
    assert tok.vocab_size == len(tok._tok.get_vocab(with_added_tokens=True)) > 256 + 3  # bytes + control tokens


# ------------------------------------------------------------------------------------------ special token ids
def ids_of(tok, *tokens):
    return {tok._tok.token_to_id(t) for t in tokens}


def test_stop_ids(model_dirs):
    qwen = Tokenizer(model_dirs["qwen2.5-7b-instruct"])
    assert qwen.eos_id == qwen._tok.token_to_id("<|im_end|>")
    assert qwen.stop_ids == ids_of(qwen, "<|im_end|>", "<|endoftext|>")
    llama = Tokenizer(model_dirs["llama-3.1-8b-instruct"])
    assert llama.eos_id == llama._tok.token_to_id("<|eot_id|>")
    assert llama.stop_ids == ids_of(llama, "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    smol = Tokenizer(model_dirs["smollm2-135m-instruct"])
    assert smol.stop_ids == ids_of(smol, "<|im_end|>") and smol.bos_id == smol._tok.token_to_id("<|im_start|>")


def test_stop_ids_from_int_eos_and_config_json(tmp_path):
    d = make_model_dir(tmp_path / "m", "llama-3-8b-instruct", gen_eos="int")
    tok = Tokenizer(d)
    assert tok.stop_ids == ids_of(tok, "<|eot_id|>", "<|end_of_text|>")  # eot from the vocab, end_of_text from gen
    (d / "generation_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"eos_token_id": [tok._tok.token_to_id("<|end_of_text|>")]}))
    assert Tokenizer(d).stop_ids == ids_of(tok, "<|eot_id|>", "<|end_of_text|>")


def test_eos_from_generation_config_when_tokenizer_config_has_none(tmp_path):
    d = make_model_dir(tmp_path / "m", "qwen2.5-7b-instruct", config_overrides={"eos_token": None})
    tok = Tokenizer(d)
    assert tok.eos_id == tok._tok.token_to_id("<|im_end|>")  # first of generation_config's list


def test_pad_falls_back_to_eos(model_dirs):
    llama = Tokenizer(model_dirs["llama-3.1-8b-instruct"])  # no pad_token
    assert llama.pad_id == llama.eos_id
    qwen = Tokenizer(model_dirs["qwen2.5-7b-instruct"])  # pad_token <|endoftext|>
    assert qwen.pad_id == qwen._tok.token_to_id("<|endoftext|>") != qwen.eos_id


def test_added_token_dicts_in_tokenizer_config(tmp_path):
    as_dict = {"content": "<|eot_id|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    d = make_model_dir(tmp_path / "m", "llama-3.1-8b-instruct", config_overrides={"eos_token": as_dict})
    tok = Tokenizer(d)
    assert tok.eos_id == tok._tok.token_to_id("<|eot_id|>")


# ------------------------------------------------------------------------------------------- template sources
def test_template_list_and_chat_template_jinja_file(tmp_path):
    real = template_text("qwen2.5-7b-instruct")
    d = make_model_dir(tmp_path / "list", "qwen2.5-7b-instruct", config_overrides={"chat_template": [
        {"name": "tool_use", "template": "{{ 'unused' }}<|im_start|>"}, {"name": "default", "template": real}]})
    assert Tokenizer(d).default_system_prompt.startswith("You are Qwen")
    # chat_template.jinja (how transformers >= 4.43 saves templates) wins over tokenizer_config.json
    (d / "chat_template.jinja").write_text(template_text("smollm2-135m-instruct"), encoding="utf-8")
    assert Tokenizer(d).default_system_prompt.endswith("named SmolLM, trained by Hugging Face")


def test_no_template_falls_back_to_vocabulary(tmp_path):
    tok = Tokenizer(make_model_dir(tmp_path / "c", "qwen2.5-7b-instruct", template=None))
    assert (tok.family, tok.default_system_prompt) == ("chatml", None)
    assert tok.chat([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tok = Tokenizer(make_model_dir(tmp_path / "l", "llama-3.1-8b-instruct", template=None))
    assert (tok.family, tok.variant) == ("llama3", "llama3.0")


# ------------------------------------------------------------------------------------------------------ errors
def test_unknown_role_and_empty_messages(model_dirs):
    tok = Tokenizer(model_dirs["qwen2.5-7b-instruct"])
    with pytest.raises(ValueError, match="allowed roles: system, user, assistant"):
        tok.chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="allowed roles"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"content": "no role"}])
    with pytest.raises(ValueError, match="empty"):
        tok.chat([])
    with pytest.raises(ValueError, match="string"):
        tok.chat([{"role": "user", "content": None}])


GEMMA = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + "
         "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}")


def test_unknown_family_is_a_one_line_error(tmp_path):
    d = make_model_dir(tmp_path / "g", "qwen2.5-7b-instruct", config_overrides={"chat_template": GEMMA})
    with pytest.raises(ValueError) as err:
        Tokenizer(d)
    assert "supported families: ChatML" in str(err.value) and "Llama-3" in str(err.value)
    assert "\n" not in str(err.value)
    # no template, and a vocabulary with neither <|im_start|> nor <|start_header_id|>
    d = tmp_path / "bare"
    d.mkdir()
    build_tokenizer_json(["<s>", "</s>"]).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="supported families"):
        Tokenizer(d)


def test_reasoning_chatml_template_is_refused(tmp_path):
    think = template_text("qwen2.5-7b-instruct").replace("{%- endfor %}", "{{- '<think>' }}{%- endfor %}")
    d = make_model_dir(tmp_path / "t", "qwen2.5-7b-instruct", config_overrides={"chat_template": think})
    with pytest.raises(ValueError, match="<think>"):
        Tokenizer(d)


def test_template_tokens_missing_from_vocabulary(tmp_path):
    d = make_model_dir(tmp_path / "m", "qwen2.5-7b-instruct",
                       config_overrides={"chat_template": template_text("llama-3.1-8b-instruct")})
    with pytest.raises(ValueError, match="lacks"):
        Tokenizer(d)


def test_unreadable_tokenizer_files_name_the_file(tmp_path):
    from support import UserError
    d = make_model_dir(tmp_path / "q", "qwen2.5-7b-instruct")
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",', encoding="utf-8")
    with pytest.raises(UserError, match=r"tokenizer_config.json: invalid JSON at line 1"):
        Tokenizer(d)
    (d / "tokenizer_config.json").write_text('["not", "an", "object"]', encoding="utf-8")
    with pytest.raises(UserError, match=r"tokenizer_config.json: expected a JSON object, got list"):
        Tokenizer(d)
    (d / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(UserError, match=r"tokenizer.json cannot be read .*download it again") as e:
        Tokenizer(d)
    assert "\n" not in str(e.value)
