"""Tokenizer and chat formatting for a Hugging Face-layout model directory: the model's template.

`Tokenizer(model_dir)` wraps `tokenizers.Tokenizer` (tokenizer.json) and renders a chat with the
model's own Jinja chat template, as `transformers`' `apply_chat_template` renders it. The template
comes from `chat_template.jinja` if the directory has one (transformers gives it priority),
otherwise from tokenizer_config.json's `chat_template` (a string, or a list of named templates, of
which "default" is used). It runs in jinja2's `ImmutableSandboxedEnvironment` (a template is
untrusted input from a download) with `trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension
and what transformers gives a template (and limits: below):

* variables: `messages`, `add_generation_prompt`, `tools` and `documents` (None), the special
  tokens of tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`, ... where set),
  `enable_thinking`, and `date_string` when you pin it;
* functions: `raise_exception(message)` (our error: one line naming the model and the template's
  message), `strftime_now(format)` (today's date, as Llama-3.2's template writes it),
  `namespace(...)` (refusing names that start with "_"); the `tojson` filter as transformers
  defines it (JSON without HTML escaping, non-ASCII kept).

A template cannot hang or fill the memory: one rendering may take at most 1,000,000 loop steps
and calls (MAX_STEPS) and 10 s (MAX_SECONDS), and no string or list it builds, nor its output, may
pass twice the messages' characters plus 1,000,000 (`*` and `**` are checked before they run);
past a limit, a one-line error names the model. jinja2's sandbox alone bounds only `range`.

tests/test_tokenizer.py checks the result, character for character and token for token, against
`transformers` on the real templates of Llama-3.0/3.1/3.2/3.3, Qwen2, Qwen2.5, Qwen3, SmolLM2,
Mistral, Gemma 2 and Gemma 3 (tests/golden/templates/, tests/golden/chat_golden.json).

What the project adds to the template, and why:

* Thinking is off by default: `enable_thinking=False` is passed, which Qwen3's template turns into
  an empty `<think>\\n\\n</think>\\n\\n` block after the generation prompt (templates that do
  not read it ignore it). `Tokenizer(..., thinking=True)` or `chat(..., thinking=True)` turns it
  on; then the answer that counts is the text after `</think>`: `answer_after_thinking(text)`.
* A template that refuses a system message (Gemma 2: "System role not supported"; found by
  rendering one, not by the model's name): a leading system message is put at the head of the
  first user turn followed by a blank line, as Gemma 3's own template does. This is said once on
  stderr and `tok.system_folded` becomes True (`tok.accepts_system` says it beforehand).

With no system message, the template's own default is used (Qwen2.5's "You are Qwen, ...",
Llama-3.1's date block), as `apply_chat_template` and the official persona-vectors code do; to
control it, pass a system message first. Messages are {"role": "system" | "user" | "assistant",
"content": str}; tool calls and images are not used.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from tokenizers import Tokenizer as _HFTokenizer

from support import UserError
from support.files import read_json, read_text

ROLES = ("system", "user", "assistant")
# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_PROBE_USER = {"role": "user", "content": "Hi"}
_PROBE_SYSTEM = {"role": "system", "content": "Be brief."}
_PROBE_REPLY = "Hello there"
# Limits on one rendering of a template (untrusted code from a download).
MAX_STEPS = 1_000_000  # loop iterations and calls
MAX_SECONDS = 10.0
MAX_CHARS = 1_000_000  # a value's or the output's length, beyond twice the messages' characters
MAX_POWER_BITS = 100_000  # the size of an integer that ** or * may make


def _strftime_now(fmt: str) -> str:
    """Today's date as a template's `strftime_now` gives it (a module function: tests pin it)."""
    return datetime.now().strftime(fmt)


def answer_after_thinking(text: str) -> str:
    """The answer in a decoded reply of a thinking model: the text after the last `</think>`
    (leading newlines dropped, as Qwen3's template drops them); "" while a `<think>` block is
    still open (the reply ran out of tokens thinking); the text itself when it has no think block.
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].lstrip("\n")
    return "" if "<think>" in text else text


def think_marks(tok) -> tuple[int, frozenset[int]]:
    """(the id of `</think>`, the ids of the newline tokens written after it) for a thinking
    model's tokenizer; a UserError when it has no `</think>` token (no thinking mode)."""
    close = tok.encode("</think>")
    if len(close) != 1:
        raise UserError(
            f"{tok.name} has no </think> token, so it has no thinking mode "
            "(Qwen3 has one): drop --thinking"
        )
    newlines = {
        i for n in (1, 2, 3) for i in tok.encode("\n" * n) if not tok.decode([i]).strip("\n")
    }
    return close[0], frozenset(newlines)


def answer_start(ids: list[int], close: int, newlines: frozenset[int]) -> int:
    """Where a thinking model's answer begins in its reply `ids`: after the first `</think>` and
    the newline tokens that follow it (len(ids) when the reply never closed its think block).

    >>> answer_start([5, 6, 9, 1, 1, 7, 1], close=9, newlines=frozenset({1}))
    5
    """
    if close not in ids:
        return len(ids)
    s = ids.index(close) + 1
    while s < len(ids) and (ids[s] in newlines or ids[s] == close):
        s += 1
    return s


def split_thinking(tok, ids: list[int]) -> tuple[list[int], list[int]]:
    """A reply's ids -> (think block, answer); all answer unless `tok.thinking` is on."""
    if not getattr(tok, "thinking", False):
        return [], list(ids)
    s = answer_start(list(ids), *think_marks(tok))
    return list(ids[:s]), list(ids[s:])


# ------------------------------------------------------------------------------ the sandbox
def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson`: plain json.dumps (jinja2's own escapes <, >, & and ' for HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _check_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _Namespace(Namespace):
    """jinja2's `namespace()`, refusing attribute names starting with "_" (as transformers does)."""

    def __init__(self, *args, **kwargs):
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        super().__init__(attrs)

    def __setitem__(self, name, value):
        _check_name(name)
        super().__setitem__(name, value)


def _check_jinja2_version(version: str = jinja2.__version__) -> None:
    """jinja2 before 3.1.6 has known sandbox escapes (CVE-2024-56326, CVE-2025-27516, ...)."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    if numbers < (3, 1, 6):
        raise UserError(
            f"jinja2 {version} has known sandbox escapes, and chat templates are "
            "untrusted input: pip install -U 'jinja2>=3.1.6'"
        )


class _TooMuch(jinja2.exceptions.TemplateError):
    """A rendering past one of the limits (MAX_STEPS, MAX_SECONDS, the size limit)."""


class TemplateTooCostly(UserError):
    """A chat template that went past the limits on a rendering: not retried on other chats."""


class _Limits:
    """What one rendering may still spend; one per render, per thread (see _render)."""

    def __init__(self, max_chars: int):
        self.steps_left = MAX_STEPS
        self.deadline = time.monotonic() + MAX_SECONDS
        self.max_chars = max_chars

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise _TooMuch(f"more than {MAX_STEPS} loop steps and calls")
        if time.monotonic() > self.deadline:
            raise _TooMuch(f"more than {MAX_SECONDS:g} s")

    def check_size(self, value):
        if isinstance(value, (str, list, tuple)) and len(value) > self.max_chars:
            raise _TooMuch(f"a value of more than {self.max_chars} items")
        if isinstance(value, int) and value.bit_length() > MAX_POWER_BITS:
            raise _TooMuch(f"an integer of more than {MAX_POWER_BITS} bits")
        return value


_LIMITS = threading.local()  # .current: the _Limits of this thread's rendering


def _step(value=None):
    """A filter the guard puts in the compiled template: one step (returns its argument)."""
    _LIMITS.current.step()
    return value


def _counted(iterable):
    """A filter around each loop's iterable: one step an item."""
    for item in iterable:
        _LIMITS.current.step()
        yield item


def _sized(value):
    """A filter around each `~` concatenation: its result within the size limit."""
    return _LIMITS.current.check_size(value)


def _check_binop(operator: str, left, right) -> None:
    """`*` and `**` are checked before they run (a huge result costs time before it exists)."""
    if isinstance(right, bool) or not isinstance(right, int):
        return
    if operator == "**" and isinstance(left, int) and abs(left) > 1 and right > 0:
        if right * abs(left).bit_length() > MAX_POWER_BITS:
            raise _TooMuch(f"an integer of more than {MAX_POWER_BITS} bits")
    if operator == "*":
        if isinstance(left, (str, list, tuple)):
            if len(left) * right > _LIMITS.current.max_chars:
                raise _TooMuch(f"a value of more than {_LIMITS.current.max_chars} items")
        elif isinstance(left, int) and left.bit_length() + right.bit_length() > MAX_POWER_BITS:
            raise _TooMuch(f"an integer of more than {MAX_POWER_BITS} bits")


class _Guard(NodeTransformer):
    """Puts the step and size filters into a parsed template (every loop, every `~`)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_pv_counted", [], [], None, None, lineno=node.lineno)
        if node.recursive:  # loop(items) iterates items unwrapped: count the body instead
            step = nodes.Filter(nodes.Const(None), "_pv_step", [], [], None, None)
            node.body.insert(0, nodes.ExprStmt(step, lineno=node.lineno))
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        node = self.generic_visit(node)
        return nodes.Filter(node, "_pv_sized", [], [], None, None, lineno=node.lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, counting calls and checking `*`, `**`, `+`, `%` (see _Limits)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        _LIMITS.current.step()
        return _LIMITS.current.check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _check_binop(operator, left, right)
        if operator == "*" and isinstance(right, (str, list, tuple)):
            _check_binop(operator, right, left)  # 3 * "x" as "x" * 3
        return _LIMITS.current.check_size(super().call_binop(context, operator, left, right))


def _environment() -> ImmutableSandboxedEnvironment:
    _check_jinja2_version()
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update(_pv_counted=_counted, _pv_step=_step, _pv_sized=_sized)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: _strftime_now(fmt)  # found at call time: tests pin it
    env.globals["namespace"] = _Namespace
    return env


# ------------------------------------------------------------------------------ model files
def _read_json(path: Path) -> dict:
    """A JSON object file that may be absent ({}); a malformed one is a UserError naming it."""
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(token) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _load_template(model_dir: Path, config: dict) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return read_text(jinja_file)  # UTF-8, else one line naming the file
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
            template = 0  # refused below
        else:
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", template[0].get("template") if template else None)
    if template is not None and not isinstance(template, str):
        raise UserError(
            f"{model_dir / 'tokenizer_config.json'}: chat_template must be a string or a list of "
            '{"name": ..., "template": "..."}: download the model again'
        )
    return template


def _eos_ids(model_dir: Path, vocab_size: int) -> list[int]:
    """The eos_token_id values of generation_config.json / config.json (an int or a list), each a
    token id of the tokenizer."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir / name).get("eos_token_id")
        listed = eos if isinstance(eos, list) else [] if eos is None else [eos]
        for i in listed:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                raise UserError(
                    f"{model_dir / name}: eos_token_id {json.dumps(eos)[:80]} is not "
                    f"a token id (0..{vocab_size - 1}) or a list of them"
                )
        ids += listed
    return ids


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _read_tokenizer(tok_file: Path) -> _HFTokenizer:
    if not tok_file.is_file():
        raise UserError(f"{tok_file} not found (a Hugging Face-layout model directory is needed)")
    try:
        return _HFTokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a plain Exception for a file it cannot parse
        why = _one_line(e)[:200]
        raise UserError(f"{tok_file} cannot be read ({why}): download it again") from None


def _special_tokens(config: dict, vocab: dict, model_dir: Path) -> dict[str, str]:
    """The named special tokens of tokenizer_config.json that are set, each checked in the vocab."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(
                f"{model_dir}: {name} {json.dumps(text)[:80]} (tokenizer_config.json) "
                'is not a token: a string, or an object with its "content"'
            )
        if text not in vocab:
            raise UserError(
                f"{model_dir}: {name} {text!r} (tokenizer_config.json) is not in tokenizer.json"
            )
        tokens[name] = text
    return tokens


def _compile(template: str | None, model_dir: Path) -> jinja2.Template | None:
    if template is None:
        return None  # text encoding works; chat() says what is missing
    try:
        env = _environment()
        return env.from_string(_Guard().visit(env.parse(template)))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(
            f"{model_dir}: the chat template is not valid Jinja (line {e.lineno}: "
            f"{_one_line(e.message)})"
        ) from None


class Tokenizer:
    """Encode/decode text; render chats with the model's own template (see the module docstring)."""

    def __init__(self, model_dir: str | Path, *, thinking: bool = False):
        model_dir = Path(model_dir)
        self.name = str(model_dir)
        self._tok = _read_tokenizer(model_dir / "tokenizer.json")
        self.backend = self._tok  # the `tokenizers.Tokenizer`, for what this wrapper does not cover
        config = _read_json(model_dir / "tokenizer_config.json")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Size of the tokenizer's vocabulary; the embedding matrix may have more (padded) rows.
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        gen_eos = _eos_ids(model_dir, self.vocab_size)
        # The special tokens by name (bos_token, eos_token, ...), as the template sees them.
        self.special_tokens: dict[str, str] = _special_tokens(config, vocab, model_dir)
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.bos_id: int | None = vocab.get(self.bos_token) if self.bos_token else None
        eos = self.special_tokens.get("eos_token")
        if eos is None and not gen_eos:
            raise UserError(
                f"{model_dir}: no eos_token in tokenizer_config.json and no eos_token_id in "
                "generation_config.json or config.json"
            )
        self.eos_id: int = vocab[eos] if eos is not None else gen_eos[0]
        pad = self.special_tokens.get("pad_token")
        self.pad_id: int = self.eos_id if pad is None else vocab[pad]

        self.thinking = thinking
        self.chat_template: str | None = _load_template(model_dir, config)
        self._template = _compile(self.chat_template, model_dir)
        # Does the template take a system message? (If even [user] fails, we cannot tell: yes.)
        with_system = self._renders([_PROBE_SYSTEM, _PROBE_USER])
        self.accepts_system: bool = with_system or not self._renders([_PROBE_USER])
        self.system_folded = False  # True once a system message was folded into a user turn
        # The token closing an assistant turn, read from the template (<|im_end|>, <end_of_turn>).
        self.turn_end: str | None = self._find_turn_end()
        turn_end_id = [vocab[self.turn_end]] if self.turn_end else []
        # Where generation stops: eos_token, generation_config / config.json eos ids, turn end.
        self.stop_ids: set[int] = {self.eos_id, *gen_eos, *turn_end_id}

    # ------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become
        their ids; nothing is added implicitly (tokenizer.json's post-processor, which adds BOS for
        Llama-3, is not applied). With `add_bos`, BOS is prepended unless the text already starts
        with it or the model has none (Qwen)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor/array)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --------------------------------------------------------------------------------- chat
    def chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        date_string: str | None = None,
        thinking: bool | None = None,
    ) -> str:
        """The prompt string the model's chat template renders for `messages`.

        add_generation_prompt: end with the header of a new assistant turn (for generation).
        date_string: the date Llama-3.1+ templates write ("Today Date: ..."; by default
            "26 Jul 2024", or today's date for Llama-3.2's), like `apply_chat_template`'s.
        thinking: enable_thinking for the template (default: the Tokenizer's `thinking`, False).
        """
        _check_messages(messages)
        if not self.accepts_system and messages[0]["role"] == "system":
            messages = self._fold_system(messages)
        extra = {} if date_string is None else {"date_string": date_string}
        think = self.thinking if thinking is None else thinking
        return self._render(messages, add_generation_prompt, enable_thinking=think, **extra)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        date_string: str | None = None,
        thinking: bool | None = None,
    ) -> list[int]:
        """Token ids of `chat(messages, ...)`; the chat has its own BOS (if any): none is added."""
        text = self.chat(
            messages, add_generation_prompt, date_string=date_string, thinking=thinking
        )
        return self.encode(text)

    def _render(self, messages, add_generation_prompt: bool, **kwargs) -> str:
        """The template's text; its errors are one-line UserErrors naming the model."""
        if self._template is None:
            raise UserError(
                f"{self.name}: no chat template (neither chat_template.jinja nor "
                "tokenizer_config.json's chat_template); an instruction-tuned model has one"
            )
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._generate(messages, add_generation_prompt, variables)
        except _TooMuch as e:
            raise TemplateTooCostly(
                f"{self.name}: the chat template goes past the limits on a rendering "
                f"({_one_line(e)}); it is not a chat template to use"
            ) from None
        except jinja2.exceptions.SecurityError as e:
            raise UserError(
                f"{self.name}: the chat template tried something the sandbox forbids "
                f"({_one_line(e)})"
            ) from None
        except jinja2.exceptions.TemplateError as e:
            raise UserError(
                f"{self.name}: the chat template refuses this conversation: {_one_line(e)}"
            ) from None
        except (
            TypeError,
            ValueError,
            LookupError,
            AttributeError,
            ArithmeticError,
            RecursionError,
            MemoryError,
        ) as e:  # Python, in the template
            raise UserError(
                f"{self.name}: the chat template fails on this conversation: "
                f"{type(e).__name__}: {_one_line(e)[:200]}"
            ) from None

    def _generate(self, messages, add_generation_prompt: bool, variables: dict) -> str:
        """The template's text, under this thread's _Limits (the output within its size limit)."""
        limits = _Limits(2 * sum(len(m["content"]) for m in messages) + MAX_CHARS)
        _LIMITS.current = limits
        try:
            parts, size = [], 0
            for part in self._template.generate(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            ):
                size += len(part)
                if size > limits.max_chars:
                    raise _TooMuch(f"an output of more than {limits.max_chars} characters")
                parts.append(part)
            return "".join(parts)
        finally:
            _LIMITS.current = None

    def _renders(self, messages) -> bool:
        try:
            self._render(messages, True, enable_thinking=False)
        except TemplateTooCostly:
            raise
        except UserError:
            return False
        return True

    def _fold_system(self, messages: list[dict]) -> list[dict]:
        """The leading system message at the head of the first user turn, then a blank line."""
        system, rest = messages[0]["content"], messages[1:]
        if rest and rest[0]["role"] == "user":
            folded = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
        else:  # no user turn to carry it: the instruction becomes the user turn
            folded = [{"role": "user", "content": system}] + rest
        if not self.system_folded:
            note = (
                f"note: the chat template of {self.name} refuses system messages; the system "
                "prompt is put at the head of the first user turn, followed by a blank line"
            )
            print(note, file=sys.stderr)
            self.system_folded = True
        return folded

    def _find_turn_end(self) -> str | None:
        """The first added token the template writes after an assistant reply, or None."""
        try:
            reply = {"role": "assistant", "content": _PROBE_REPLY}
            text = self._render([_PROBE_USER, reply], False, enable_thinking=False)
        except TemplateTooCostly:
            raise
        except UserError:
            return None
        if _PROBE_REPLY not in text:
            return None
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        tail = self._tok.encode(text.rsplit(_PROBE_REPLY, 1)[1], add_special_tokens=False)
        return next((t for t in tail.tokens if t in added), None)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, turn_end={self.turn_end!r})"


def _check_messages(messages) -> None:
    if not messages:
        raise UserError(
            "messages is empty; give at least one {'role': ..., 'content': ...} message"
        )
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise UserError(f"unknown message role {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            got = type(m.get("content")).__name__
            raise UserError(f"message content must be a string, got {got}")
