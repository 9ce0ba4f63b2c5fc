"""tokenizer.py: chat rendering against the real templates (golden file + live transformers),
encoding, special ids.

Each model directory here is a tiny stand-in built in tmp: a byte-level BPE tokenizer.json trained
on a few sentences whose special tokens are the model's control tokens, and a tokenizer_config.json
carrying the model's real chat template (tests/golden/templates/). Regenerate the golden strings
with tests/make_golden_chat.py.
"""

import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

import support.tokenizer as tokenizer_module
from support import UserError
from support.tokenizer import Tokenizer, answer_after_thinking

GOLDEN = Path(__file__).parent / "golden"
SOURCES = json.loads((GOLDEN / "templates" / "SOURCES.json").read_text(encoding="utf-8"))
NAMES = sorted(k for k in SOURCES if not k.startswith("_"))
CHAT_GOLDEN = json.loads((GOLDEN / "chat_golden.json").read_text(encoding="utf-8"))
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Hello! How can I help you today?",
    "You are a helpful assistant. Tell me a joke.",
    "Line one.\nLine two.\n\nLine four.",
    "Ça va? 日本語 🙂",
]


def template_text(name):
    return (GOLDEN / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def build_tokenizer_json(control_tokens, bos_post_processor=None, plain_tokens=()) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(control_tokens),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    # Qwen3's <think> and </think>: added tokens, not special ones
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_tokens])
    if (
        bos_post_processor
    ):  # like Llama-3's tokenizer.json, which adds BOS unless add_special_tokens=False
        bos_id = tok.token_to_id(bos_post_processor)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_post_processor} $A",
            pair=f"{bos_post_processor} $A {bos_post_processor} $B",
            special_tokens=[(bos_post_processor, bos_id)],
        )
    return tok


def make_model_dir(
    path: Path, name: str, *, template="real", gen_eos="list", config_overrides=None
) -> Path:
    """A tiny Hugging Face-layout tokenizer directory standing in for model `name` of
    SOURCES.json."""
    src = SOURCES[name]
    path.mkdir(parents=True, exist_ok=True)
    special = src["special_tokens"]
    bos = special["bos_token"] if src["adds_bos"] else None
    tok = build_tokenizer_json(src["control_tokens"], bos, src.get("plain_added_tokens", ()))
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **{k: v for k, v in special.items() if v is not None},
    }
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


# ----------------------------------------------------------------------------------- golden strings
def test_golden_file_covers_every_template():
    assert sorted(CHAT_GOLDEN) == NAMES and len(NAMES) >= 12
    for name in NAMES:
        cases = CHAT_GOLDEN[name]
        assert {c["add_generation_prompt"] for c in cases} == {True, False}
        assert len(cases) >= 20 and sum("text" in c for c in cases) >= 20


def ours(tok, case, messages=None):
    """`tok.chat` for a golden case: its template kwargs are our keywords."""
    kwargs = case["kwargs"]
    messages = case["messages"] if messages is None else messages
    return tok.chat(
        messages,
        case["add_generation_prompt"],
        thinking=kwargs["enable_thinking"],
        date_string=kwargs.get("date_string"),
    )


def check_case(tok, case, want_text, label):
    """Our rendering of `case` is `want_text` and tokenizes as it does; or both refuse it."""
    if "error" in case:
        with pytest.raises(UserError) as err:
            ours(tok, case)
        assert case["error"] in str(err.value) and tok.name in str(err.value), label
        assert "\n" not in str(err.value)
        return
    assert ours(tok, case) == want_text, label
    kwargs = case["kwargs"]
    ids = tok.encode_chat(
        case["messages"],
        case["add_generation_prompt"],
        thinking=kwargs["enable_thinking"],
        date_string=kwargs.get("date_string"),
    )
    assert ids == tok.encode(want_text), label
    if tok.bos_id is not None and SOURCES[tok_name(tok)]["adds_bos"]:
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1, label


def tok_name(tok):
    return Path(tok.name).name


@pytest.mark.parametrize("name", NAMES)
def test_chat_matches_golden(name, model_dirs, monkeypatch):
    tok = Tokenizer(model_dirs[name])
    for case in CHAT_GOLDEN[name]:
        if "frozen_now" in case:
            pin_clock(monkeypatch, case["frozen_now"])
        label = f"{name} / {case['name']} / {case['kwargs']} / agp={case['add_generation_prompt']}"
        check_case(tok, case, case.get("text"), label)
    assert tok.system_folded == any(c.get("folded") for c in CHAT_GOLDEN[name])


def test_llama32_uses_todays_date_and_date_string_overrides(model_dirs, monkeypatch):
    tok = Tokenizer(model_dirs["llama-3.2-3b-instruct"])
    pin_clock(monkeypatch, "2031-12-05T08:00:00")
    msgs = [{"role": "user", "content": "Hi"}]
    assert "Today Date: 05 Dec 2031\n\n" in tok.chat(msgs)
    assert "Today Date: 1 May 2020\n\n" in tok.chat(msgs, date_string="1 May 2020")
    # Llama-3.1's template has a fixed default and ignores the clock
    assert "Today Date: 26 Jul 2024\n\n" in Tokenizer(model_dirs["llama-3.1-8b-instruct"]).chat(
        msgs
    )


# ------------------------------------------------------------------------- live transformers parity
@pytest.mark.parametrize("name", NAMES)
def test_chat_matches_live_transformers(name, model_dirs, monkeypatch):
    transformers = pytest.importorskip("transformers")
    jinja2 = pytest.importorskip("jinja2")
    from transformers.utils import chat_template_utils

    frozen = datetime(2030, 10, 2, 9, 30)

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)
    pin_clock(monkeypatch, frozen.isoformat())
    ref = transformers.AutoTokenizer.from_pretrained(str(model_dirs[name]))
    tok = Tokenizer(model_dirs[name])
    for case in CHAT_GOLDEN[name]:
        msgs = case.get("reference_messages", case["messages"])
        agp, kwargs = case["add_generation_prompt"], case["kwargs"]
        if "error" in case:
            with pytest.raises(jinja2.exceptions.TemplateError, match=re.escape(case["error"])):
                ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp, **kwargs)
            check_case(tok, case, None, name)
            continue
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp, **kwargs)
        check_case(tok, case, want, f"{name} / {case['name']} / {kwargs}")
        want_ids = ref.apply_chat_template(
            msgs, tokenize=True, return_dict=False, add_generation_prompt=agp, **kwargs
        )
        assert tok.encode(want) == list(want_ids)


# ------------------------------------------------------------------- thinking, system folding
def test_qwen3_thinking_off_by_default_renders_the_empty_think_block(model_dirs):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    off = Tokenizer(model_dirs["qwen3-0.6b"])
    assert off.chat(msgs).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off.chat(msgs, thinking=True).endswith("<|im_start|>assistant\n")
    on = Tokenizer(model_dirs["qwen3-0.6b"], thinking=True)
    assert on.chat(msgs) == off.chat(msgs, thinking=True)
    assert on.chat(msgs, thinking=False) == off.chat(msgs)
    golden = next(
        c
        for c in CHAT_GOLDEN["qwen3-0.6b"]
        if c["name"] == "user_only"
        and c["add_generation_prompt"]
        and c["kwargs"] == {"enable_thinking": False}
    )
    assert off.chat(golden["messages"]) == golden["text"]
    # the think token ids are those of the model's own <think> / </think> tokens
    ids = off.encode_chat(msgs)
    assert off.backend.token_to_id("</think>") in ids and off.backend.token_to_id("<think>") in ids


def test_answer_after_thinking():
    assert answer_after_thinking("<think>\nLet me see.\n</think>\n\nFour.") == "Four."
    assert answer_after_thinking("<think>\na</think>b</think>\n\nc") == "c"
    assert answer_after_thinking("<think>\nStill thinking when the tokens ran out") == ""
    assert answer_after_thinking("Four.\n") == "Four.\n"  # no think block: the text itself
    assert answer_after_thinking("\n\nFour.") == "\n\nFour."


def test_gemma2_folds_the_system_message_into_the_first_user_turn(model_dirs, capsys):
    gemma2, gemma3 = Tokenizer(model_dirs["gemma-2-2b-it"]), Tokenizer(model_dirs["gemma-3-it"])
    assert not gemma2.accepts_system and gemma3.accepts_system and not gemma2.system_folded
    msgs = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    want = "<bos><start_of_turn>user\nYou are a pirate.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert gemma2.chat(msgs) == want == gemma3.chat(msgs)  # Gemma 3's template does the same
    assert gemma2.system_folded and not gemma3.system_folded
    gemma2.chat(msgs)
    err = capsys.readouterr().err
    assert err.count("refuses system messages") == 1 and "gemma-2-2b-it" in err
    # without a system message nothing is folded
    fresh = Tokenizer(model_dirs["gemma-2-2b-it"])
    want = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert fresh.chat(msgs[1:]) == want
    assert not fresh.system_folded and capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------- encode / decode
def test_encode_never_duplicates_bos(model_dirs):
    tok = Tokenizer(model_dirs["llama-3.1-8b-instruct"])
    bos = tok.bos_id
    assert bos == tok._tok.token_to_id("<|begin_of_text|>")
    assert tok._tok.encode("Hello").ids[0] == bos  # the raw post-processor would add one ...
    assert bos not in tok.encode("Hello")  # ... but encode adds nothing implicitly
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
    # Qwen has no BOS
    assert tok.bos_id is None and tok.encode("Hello", add_bos=True) == tok.encode("Hello")
    text = "Ça va? 日本語 🙂 — new\nline"
    assert tok.decode(tok.encode(text)) == text
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(tok.encode(text))) == text


def test_vocab_size(model_dirs):
    tok = Tokenizer(model_dirs["smollm2-135m-instruct"])
    # bytes + control tokens
    assert tok.vocab_size == len(tok._tok.get_vocab(with_added_tokens=True)) > 256 + 3


# -------------------------------------------------------------------------------- special token ids
def ids_of(tok, *tokens):
    return {tok._tok.token_to_id(t) for t in tokens}


def test_stop_ids(model_dirs):
    qwen = Tokenizer(model_dirs["qwen2.5-7b-instruct"])
    assert qwen.eos_id == qwen._tok.token_to_id("<|im_end|>") and qwen.turn_end == "<|im_end|>"
    assert qwen.stop_ids == ids_of(qwen, "<|im_end|>", "<|endoftext|>")
    llama = Tokenizer(model_dirs["llama-3.1-8b-instruct"])
    assert llama.eos_id == llama._tok.token_to_id("<|eot_id|>") and llama.turn_end == "<|eot_id|>"
    assert llama.stop_ids == ids_of(llama, "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    smol = Tokenizer(model_dirs["smollm2-135m-instruct"])
    assert smol.stop_ids == ids_of(smol, "<|im_end|>") and smol.bos_id == smol._tok.token_to_id(
        "<|im_start|>"
    )
    qwen3 = Tokenizer(model_dirs["qwen3-0.6b"])
    assert qwen3.stop_ids == ids_of(qwen3, "<|im_end|>", "<|endoftext|>")
    assert qwen3.turn_end == "<|im_end|>"
    for name in ("gemma-2-2b-it", "gemma-3-it"):  # eos_token <eos>; turns end with <end_of_turn>
        gemma = Tokenizer(model_dirs[name])
        assert gemma.eos_id == gemma._tok.token_to_id("<eos>") and gemma.turn_end == "<end_of_turn>"
        assert gemma.stop_ids == ids_of(gemma, "<eos>", "<end_of_turn>")
    for name in ("mistral-7b-instruct-v0.3", "mistral-nemo-instruct-2407"):
        mistral = Tokenizer(model_dirs[name])
        assert mistral.stop_ids == ids_of(mistral, "</s>") and mistral.turn_end == "</s>"


def test_stop_ids_from_the_files_and_the_template(tmp_path):
    """Without generation_config.json the turn end read from the template still stops generation."""
    d = make_model_dir(tmp_path / "g", "gemma-2-2b-it", gen_eos=None)
    tok = Tokenizer(d)
    assert tok.stop_ids == ids_of(tok, "<eos>", "<end_of_turn>")


def test_stop_ids_from_int_eos_and_config_json(tmp_path):
    d = make_model_dir(tmp_path / "m", "llama-3-8b-instruct", gen_eos="int")
    tok = Tokenizer(d)
    # eot: eos_token, end_of_text: generation_config
    assert tok.stop_ids == ids_of(tok, "<|eot_id|>", "<|end_of_text|>")
    (d / "generation_config.json").unlink()
    (d / "config.json").write_text(
        json.dumps({"eos_token_id": [tok._tok.token_to_id("<|end_of_text|>")]})
    )
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
    as_dict = {
        "content": "<|eot_id|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    d = make_model_dir(
        tmp_path / "m", "llama-3.1-8b-instruct", config_overrides={"eos_token": as_dict}
    )
    tok = Tokenizer(d)
    assert tok.eos_id == tok._tok.token_to_id("<|eot_id|>")


# --------------------------------------------------------------------------------- template sources
def test_template_list_and_chat_template_jinja_file(tmp_path):
    real = template_text("qwen2.5-7b-instruct")
    d = make_model_dir(
        tmp_path / "list",
        "qwen2.5-7b-instruct",
        config_overrides={
            "chat_template": [
                {"name": "tool_use", "template": "{{ 'unused' }}<|im_start|>"},
                {"name": "default", "template": real},
            ]
        },
    )
    user = [{"role": "user", "content": "Hi"}]
    assert "You are Qwen, created by Alibaba Cloud" in Tokenizer(d).chat(user)
    # chat_template.jinja (how transformers >= 4.43 saves templates) wins over tokenizer_config.json
    (d / "chat_template.jinja").write_text(template_text("smollm2-135m-instruct"), encoding="utf-8")
    assert "named SmolLM, trained by Hugging Face" in Tokenizer(d).chat(user)


def test_no_template_encodes_but_chat_says_what_is_missing(tmp_path):
    tok = Tokenizer(make_model_dir(tmp_path / "c", "qwen2.5-7b-instruct", template=None))
    assert tok.decode(tok.encode("Hello")) == "Hello" and tok.turn_end is None
    with pytest.raises(UserError, match="no chat template") as err:
        tok.chat([{"role": "user", "content": "Hi"}])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- errors
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


def with_template(tmp_path, template: str) -> Tokenizer:
    return Tokenizer(
        make_model_dir(
            tmp_path / "m", "qwen2.5-7b-instruct", config_overrides={"chat_template": template}
        )
    )


def test_raise_exception_is_a_one_line_error_naming_the_model(tmp_path):
    tok = with_template(
        tmp_path,
        "{% if messages|length > 1 %}"
        "{{ raise_exception('Only one\nmessage, please') }}"
        "{% endif %}{{ messages[0]['content'] }}",
    )
    assert tok.chat([{"role": "user", "content": "Hi"}]) == "Hi"
    with pytest.raises(UserError) as err:
        tok.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    msg = str(err.value)
    assert "Only one message, please" in msg and str(tmp_path / "m") in msg and "\n" not in msg


def test_a_python_error_inside_the_template_is_a_one_line_error(tmp_path):
    tok = with_template(tmp_path, "{{ messages[0]['content'] + 1 }}")  # str + int: a TypeError
    with pytest.raises(
        UserError, match="chat template fails on this conversation: TypeError"
    ) as err:
        tok.chat([{"role": "user", "content": "Hi"}])
    assert "\n" not in str(err.value) and tok.accepts_system  # the probes did not crash either


SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
    "{{ namespace(__class__=1) }}",
    "{% set d = {} %}{{ d.update({'a': 1}) }}",  # the immutable sandbox: no mutation of data
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
def test_the_sandbox_refuses_python_internals(tmp_path, template):
    tok = with_template(tmp_path, template)
    with pytest.raises(UserError, match="sandbox forbids") as err:
        tok.chat([{"role": "user", "content": "Hi"}])
    assert "\n" not in str(err.value) and str(tmp_path / "m") in str(err.value)


def test_tojson_strftime_and_loop_controls_as_transformers_gives_them(tmp_path, monkeypatch):
    tok = with_template(
        tmp_path,
        "{{ {'b': '<é>', 'a': 1} | tojson }}|"
        "{{ [1] | tojson(indent=2) }}|{{ strftime_now('%Y-%m-%d') }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}"
        "{% endif %}{{ m.content }}{% endfor %}|{{ eos_token }}",
    )
    pin_clock(monkeypatch, "2029-02-03T04:05:06")
    got = tok.chat([{"role": "user", "content": "A"}, {"role": "user", "content": "B"}])
    assert got == '{"b": "<é>", "a": 1}|[\n  1\n]|2029-02-03|A|<|im_end|>'


def test_the_sandbox_renders_a_bare_internal_attribute_as_nothing(tmp_path):
    """A lone unsafe attribute is jinja2's undefined, printed as "" (as under transformers)."""
    tok = with_template(
        tmp_path, "[{{ messages.__class__ }}|{{ ''.__class__ }}|{{ raise_exception.__globals__ }}]"
    )
    assert tok.chat([{"role": "user", "content": "Hi"}]) == "[||]"


def test_an_old_jinja2_with_known_sandbox_escapes_is_refused():
    from support.tokenizer import _check_jinja2_version

    _check_jinja2_version("3.1.6")
    _check_jinja2_version("3.2.0rc1")
    with pytest.raises(
        UserError, match=r"jinja2 3\.1\.5 has known sandbox escapes.*jinja2>=3\.1\.6"
    ):
        _check_jinja2_version("3.1.5")


def test_invalid_template_syntax_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"not valid Jinja \(line 1") as err:
        with_template(tmp_path, "{% for m in messages %}{{ m.content }")
    assert "\n" not in str(err.value)


def test_unreadable_tokenizer_files_name_the_file(tmp_path):
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


# A template is untrusted code: each of these hung, or filled the memory, or ended in a traceback
# (OverflowError, TypeError) before the limits on a rendering (support/tokenizer.py: MAX_STEPS).
COSTLY_TEMPLATES = [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n < 40 %}{{ f(n+1) }}{{ f(n+1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "{% for x in [1] recursive %}{% if loop.depth < 40 %}{{ loop([1, 2]) }}{% endif %}{% endfor %}",
    "{{ 'x' * 10**10 }}",
    "{{ 10**(10**7) }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{% for i in range(99999) %}{{ 'x' * 99 }}{% endfor %}",  # output past the limit
    "{{ 'x'.center(10**8) }}",
]


@pytest.mark.parametrize("template", COSTLY_TEMPLATES)
def test_a_template_that_would_hang_or_fill_the_memory_is_stopped(tmp_path, template, monkeypatch):
    # the same limit, reached sooner:
    monkeypatch.setattr(tokenizer_module, "MAX_STEPS", 100_000, raising=False)
    with pytest.raises(UserError, match="goes past the limits on a rendering") as err:
        with_template(tmp_path, template)  # the probes at load time stop at the first
    assert "\n" not in str(err.value) and str(tmp_path / "m") in str(err.value)


def test_the_time_limit_stops_a_slow_template(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_SECONDS", 0.0, raising=False)
    with pytest.raises(UserError, match=r"goes past the limits on a rendering \(more than 0 s\)"):
        with_template(tmp_path, "{% for m in messages %}{{ m.content }}{% endfor %}")


@pytest.mark.parametrize("template", ["{% for i in range(10**9) %}x{% endfor %}", "{{ 1 / 0 }}"])
def test_arithmetic_errors_in_a_template_are_one_line_errors(tmp_path, template):
    tok = with_template(tmp_path, template)
    with pytest.raises(UserError, match="fails on this conversation: (OverflowError|ZeroDiv)") as e:
        tok.chat([{"role": "user", "content": "Hi"}])
    assert "\n" not in str(e.value)


def test_long_messages_and_real_templates_stay_within_the_limits(model_dirs):
    tok = Tokenizer(model_dirs["qwen3-0.6b"])
    long = "word " * 400_000  # 2,000,000 characters: the size limit grows with the messages
    chat = [{"role": "user", "content": long}, {"role": "assistant", "content": long}] * 3
    assert tok.chat(chat).count(long) == 6


@pytest.mark.parametrize("value", [5, {"a": 1}, [1, 2], ["x"]])
def test_a_chat_template_that_is_no_string_is_a_one_line_error(tmp_path, value):
    with pytest.raises(UserError, match="chat_template must be a string or a list") as err:
        with_template(tmp_path, value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "files, message",
    [
        ({"tokenizer_config.json": {"eos_token": ["<|im_end|>"]}}, "eos_token .* is not a token"),
        (
            {"tokenizer_config.json": {"chat_template": [{"name": ["a"], "template": "x"}]}},
            "chat_template must be a string or a list",
        ),
        ({"generation_config.json": {"eos_token_id": "x"}}, 'eos_token_id "x" is not a token id'),
        (
            {"generation_config.json": {"eos_token_id": [1.5]}},
            r"eos_token_id \[1.5\] is not a token",
        ),
        ({"config.json": {"eos_token_id": -1}}, "eos_token_id -1 is not a token id"),
        ({"config.json": {"eos_token_id": 10**9}}, "eos_token_id 1000000000 is not a token id"),
    ],
)
def test_special_tokens_and_eos_ids_of_the_wrong_type_are_one_line_errors(tmp_path, files, message):
    """Each was a TypeError or ValueError traceback, or (1.5, 10**9, -1) an id taken as is."""
    d = make_model_dir(tmp_path / "m", "qwen2.5-7b-instruct")
    for name, edit in files.items():
        path = d / name
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        path.write_text(json.dumps(old | edit), encoding="utf-8")
    with pytest.raises(UserError, match=message) as e:
        Tokenizer(d)
    assert "\n" not in str(e.value)


def test_a_chat_template_file_that_is_not_utf8_is_one_line(tmp_path):
    d = make_model_dir(tmp_path / "latin", "qwen2.5-7b-instruct")
    (d / "chat_template.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    with pytest.raises(UserError, match="chat_template.jinja.*UTF-8") as err:
        Tokenizer(d)
    assert "\n" not in str(err.value)
