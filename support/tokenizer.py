"""Tokenizer and chat formatting for a Hugging Face-layout model directory, without jinja2.

`Tokenizer(model_dir)` wraps `tokenizers.Tokenizer` (tokenizer.json) and renders chats exactly as the model's own
chat template does, for the families below. Instead of running the Jinja template, each family's format is written
out by hand, and the few values that differ between models (the default system prompt, the Llama date line) are read
out of the template text itself. tests/test_tokenizer.py checks the result character for character against the real
templates rendered by `transformers` (tests/golden/chat_golden.json).

The template is taken from `chat_template.jinja` if the directory has one (transformers gives it priority), otherwise
from tokenizer_config.json's `chat_template` (a string, or a list of named templates, of which "default" is used).
Without any template, the family is guessed from the vocabulary and no default system prompt is inserted.

Supported families and what each does when the conversation has NO system message:

* ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, generation prompt `<|im_start|>assistant\\n`): Qwen2, Qwen2.5,
  SmolLM2. No BOS token, message content is used verbatim (not stripped). If the first message is not a system
  message, the template inserts its default system prompt:
    - Qwen2.5-Instruct: "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    - Qwen2-Instruct:   "You are a helpful assistant."
    - SmolLM2-Instruct: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
  (read from the template's `'<|im_start|>system\\n...<|im_end|>'` string; a template without one inserts nothing).
  Reasoning templates with `<think>` (Qwen3, SmolLM3) are refused: they are not this format.
* Llama-3 (`<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`..., generation prompt
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n`). Every message's content is stripped of leading and trailing
  whitespace (the template's `| trim`).
    - Llama-3.0: no system block at all unless you give one.
    - Llama-3.1 / 3.2 / 3.3: there is no default system *prompt*, but the template ALWAYS writes a system block that
      starts with "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n"; a system message of yours
      (trimmed) is appended after that text, inside the same block. Llama-3.2's template puts today's date there
      instead (`strftime_now("%d %b %Y")`, as transformers does), so its prompts change from day to day; pass
      `date_string=` to `chat()` to pin it. Only a system message in first position goes into that block; a later
      one is rendered as an ordinary `system` turn, as the template does.

POLICY: we reproduce the model's own template exactly. So with no system message the model's default system prompt
(or, for Llama-3.1+, the date block) is inserted, just as `tokenizer.apply_chat_template` does and as the official
persona-vectors code (which calls `apply_chat_template`) does. To control the system prompt, pass an explicit
{"role": "system", "content": ...} message as the first message.

Tool calling, images and other template branches are not supported: messages are {"role": "system" | "user" |
"assistant", "content": str} only.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from support import UserError
from support.files import read_json

ROLES = ("system", "user", "assistant")
SUPPORTED_FAMILIES = "ChatML (Qwen2, Qwen2.5, SmolLM2) and Llama-3 (3.0, 3.1, 3.2, 3.3)"

# Tokens that end an assistant turn, whenever the vocabulary has them.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")

# The default system prompt of a ChatML template: one Jinja string literal holding
# '<|im_start|>system\n<text><|im_end|>' (the \n written either as an escape or as a real newline).
_CHATML_DEFAULT_SYSTEM = re.compile(
    r"""(?P<q>['"])<\|im_start\|>system(?:\\n|\n)(?P<text>(?:\\.|(?!(?P=q))[^\\])*?)<\|im_end\|>""")
_LLAMA_CUTOFF = re.compile(r"Cutting Knowledge Date: (.*?)(?:\\n|\n)")
_LLAMA_DEFAULT_DATE = re.compile(r"""set date_string = (['"])(.*?)\1""")
_LLAMA_STRFTIME = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")
_JINJA_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "'": "'", '"': '"', "\\": "\\"}


def _strftime_now(fmt: str) -> str:
    """Today's date as the Llama-3.2 template's `strftime_now` gives it (a function, so tests can pin it)."""
    return datetime.now().strftime(fmt)


def _read_json(path: Path) -> dict:
    """A JSON object file that may be absent ({}); a malformed one is a UserError naming it."""
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(token) -> str | None:
    """A special token in tokenizer_config.json is a string, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _unescape(s: str) -> str:
    """Undo the backslash escapes of a Jinja string literal."""
    return re.sub(r"\\(.)", lambda m: _JINJA_ESCAPES.get(m.group(1), m.group(0)), s, flags=re.S)


def _load_template(model_dir: Path, config: dict) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", template[0].get("template") if template else None)
    return template


class Tokenizer:
    """Encode/decode text and render chats the way the model's chat template does (see the module docstring)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise UserError(f"{tok_file} not found (a Hugging Face-layout model directory is needed)")
        try:
            self._tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a plain Exception for a file it cannot parse
            raise UserError(f"{tok_file} cannot be read ({' '.join(str(e).split())[:200]}): download it again") from None
        self.backend = self._tok  # the `tokenizers.Tokenizer`, for what this wrapper does not cover
        config = _read_json(model_dir / "tokenizer_config.json")
        gen_config = _read_json(model_dir / "generation_config.json")
        model_config = _read_json(model_dir / "config.json")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Size of the tokenizer's vocabulary; the model's embedding matrix may have more (padded) rows.
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

        def token_id(name: str) -> int | None:
            text = _token_text(config.get(name))
            if text is None:
                return None
            if text not in vocab:
                raise UserError(f"{model_dir}: {name} {text!r} from tokenizer_config.json is not in tokenizer.json")
            return vocab[text]

        config_eos = []
        for cfg in (gen_config, model_config):
            eos = cfg.get("eos_token_id")
            config_eos += eos if isinstance(eos, list) else [] if eos is None else [eos]

        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.bos_id: int | None = token_id("bos_token")
        eos_id = token_id("eos_token")
        if eos_id is None:
            if not config_eos:
                raise UserError(f"{model_dir}: no eos_token in tokenizer_config.json and no eos_token_id in "
                                "generation_config.json or config.json")
            eos_id = int(config_eos[0])
        self.eos_id: int = eos_id
        pad_id = token_id("pad_token")
        self.pad_id: int = eos_id if pad_id is None else pad_id
        self.stop_ids: set[int] = ({eos_id} | {vocab[t] for t in _TURN_END_TOKENS if t in vocab}
                                   | {int(i) for i in config_eos})

        self.chat_template: str | None = _load_template(model_dir, config)
        self.family, self.variant, self._format = self._detect(self.chat_template, vocab, model_dir)
        # ChatML: the system prompt inserted when none is given (None: nothing is inserted).
        self.default_system_prompt: str | None = self._format.get("default_system")

    # ----------------------------------------------------------------------------------------------- detection
    @staticmethod
    def _detect(template: str | None, vocab: dict, model_dir: Path) -> tuple[str, str, dict]:
        """-> (family, variant, format values read from the template)."""
        unsupported = UserError(f"{model_dir}: unsupported chat format; supported families: {SUPPORTED_FAMILIES}")
        if template is not None:
            is_chatml, is_llama3 = "<|im_start|>" in template, "<|start_header_id|>" in template
        else:  # no template: guess from the vocabulary
            is_chatml, is_llama3 = "<|im_start|>" in vocab, "<|start_header_id|>" in vocab
        if is_chatml and not is_llama3:
            if template is not None and "<think>" in template:
                raise UserError(f"{model_dir}: reasoning (<think>) chat templates are not supported; supported "
                                f"families: {SUPPORTED_FAMILIES}")
            needed, family = ("<|im_start|>", "<|im_end|>"), "chatml"
            m = _CHATML_DEFAULT_SYSTEM.search(template or "")
            fmt = {"default_system": _unescape(m.group("text")) if m else None}
            variant = "chatml"
        elif is_llama3 and not is_chatml:
            needed, family = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama3"
            cutoff = _LLAMA_CUTOFF.search(template or "")
            if cutoff is None:  # Llama-3.0: no system block of its own
                fmt, variant = {"date_block": False}, "llama3.0"
            else:  # Llama-3.1/3.2/3.3: a system block with the knowledge cutoff and a date, always
                default_date = _LLAMA_DEFAULT_DATE.search(template)
                strftime = _LLAMA_STRFTIME.search(template)
                fmt = {"date_block": True, "cutoff": cutoff.group(1),
                       "default_date": default_date.group(2) if default_date else None,
                       "strftime": strftime.group(2) if strftime else None}
                if fmt["default_date"] is None and fmt["strftime"] is None:
                    raise unsupported
                variant = "llama3.1"
        else:
            raise unsupported
        missing = [t for t in needed if t not in vocab]
        if missing:
            raise UserError(f"{model_dir}: the {family} chat format needs {missing}, which tokenizer.json lacks")
        return family, variant, fmt

    # --------------------------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become their ids; nothing is
        added implicitly (tokenizer.json's post-processor, which adds BOS for Llama-3, is not applied). With
        `add_bos`, BOS is prepended unless the text already starts with it or the model has none (Qwen)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor/array)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------------------- chat
    def chat(self, messages: list[dict], add_generation_prompt: bool = True, *, date_string: str | None = None) -> str:
        """The prompt string the model's chat template renders for `messages`.

        add_generation_prompt: end with the header of a new assistant turn (for generation).
        date_string: Llama-3.1+ only, the "Today Date:" text (default: the template's, i.e. "26 Jul 2024", or
            today's date for Llama-3.2's template); like `apply_chat_template(..., date_string=...)`.
        """
        _check_messages(messages)
        if self.family == "chatml":
            return self._chat_chatml(messages, add_generation_prompt)
        return self._chat_llama3(messages, add_generation_prompt, date_string)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    date_string: str | None = None) -> list[int]:
        """Token ids of `chat(messages, ...)`; the chat string carries its own BOS (if any), so none is added."""
        return self.encode(self.chat(messages, add_generation_prompt, date_string=date_string))

    def _chat_chatml(self, messages, add_generation_prompt):
        parts = []
        default_system = self._format["default_system"]
        if default_system is not None and messages[0]["role"] != "system":
            parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def _chat_llama3(self, messages, add_generation_prompt, date_string):
        parts = [self.bos_token or ""]
        if self._format["date_block"]:
            system = ""
            if messages[0]["role"] == "system":
                system, messages = messages[0]["content"].strip(), messages[1:]
            if date_string is None:
                fmt = self._format
                date_string = _strftime_now(fmt["strftime"]) if fmt["strftime"] else fmt["default_date"]
            parts.append(f"<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                         f"{self._format['cutoff']}\nToday Date: {date_string}\n\n{system}<|eot_id|>")
        parts += [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                  for m in messages]
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    def __repr__(self):
        return f"Tokenizer(family={self.family!r}, variant={self.variant!r}, vocab_size={self.vocab_size})"


def _check_messages(messages) -> None:
    if not messages:
        raise UserError("messages is empty; give at least one {'role': ..., 'content': ...} message")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise UserError(f"unknown message role {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"message content must be a string, got {type(m.get('content')).__name__}")
