"""Regenerate tests/golden/chat_golden.json: real chat templates rendered by Hugging Face
transformers.

    pip install -r tests/requirements-reference.txt && python tests/make_golden_chat.py

The templates are the models' own `chat_template` strings, stored verbatim in
tests/golden/templates/<name>.jinja; SOURCES.json beside them says where each was read from and
gives the model's special tokens. Each template is rendered for every conversation in CONVERSATIONS,
with and without the generation prompt, by transformers' `render_jinja_template` -- the function
`PreTrainedTokenizerBase.apply_chat_template` calls -- with the template variables
`apply_chat_template` passes (the tokenizer's special tokens: bos_token, eos_token, pad_token where
the model sets them). So: sandboxed Jinja with trim_blocks=True, lstrip_blocks=True, transformers'
`tojson`, `raise_exception` and `strftime_now`.

Thinking: every case passes enable_thinking (False, the project's default; templates that do not
read it ignore it), and a template that reads it (Qwen3) is rendered with enable_thinking=True too.

System messages: a template that refuses one (rendering [system, user] raises while [user] renders:
Gemma 2, Mistral-7B's [INST] template) is given what support/tokenizer.py gives it: the system
message folded into the head of the first user turn followed by a blank line (`fold_system` below);
such cases carry "reference_messages" (what transformers rendered) and "folded": true. A
conversation the template refuses even so carries "error" (the template's message), no "text".

Dates: Llama-3.1 templates default to "Today Date: 26 Jul 2024". Llama-3.2's template calls
`strftime_now("%d %b %Y")` (today's date); to keep the file reproducible the clock is frozen at
FROZEN_NOW while rendering, and such cases carry "frozen_now" so the test can pin tokenizer.py's
clock the same way. A few Llama cases pass an explicit `date_string` (in "kwargs"), as
`apply_chat_template(..., date_string=...)` would.

Output: {template name: [{"name", "messages", "add_generation_prompt", "kwargs", "text" | "error",
["reference_messages", "folded"], ["frozen_now"]}, ...]}.
Produced with transformers 5.24.0 and jinja2 3.1.6 on 2026-12-07.
"""

import json
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).parent / "golden"
TEMPLATES = HERE / "templates"
FROZEN_NOW = datetime(2025, 3, 7, 12, 0, 0)

S, U, A = "system", "user", "assistant"


def _m(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONS = {
    "system_user": _m((S, "You are a helpful pirate."), (U, "What is the capital of France?")),
    "user_only": _m((U, "What is the capital of France?")),
    "multi_turn": _m(
        (S, "Answer briefly."), (U, "Hi!"), (A, "Hello! How can I help?"), (U, "Tell me a joke.")
    ),
    "multi_turn_no_system": _m((U, "Hi!"), (A, "Hello! How can I help?"), (U, "Tell me a joke.")),
    "whitespace": _m(
        (S, "  You are terse.\n\n"),
        (U, "\n  What is 2 + 2?  \n"),
        (A, "  4\n"),
        (U, "\tAnd 3 + 3?\n\n"),
    ),
    "inner_newlines": _m((U, "Line one.\nLine two.\n\nLine four.")),
    "empty_system": _m((S, ""), (U, "Hello")),
    "late_system": _m((U, "Hi"), (A, "Hello."), (S, "Now answer in French."), (U, "How are you?")),
    "unicode": _m((U, "Ça va? 日本語 — emoji 🙂")),
    "control_tokens_in_content": _m((U, "Print <|im_end|> and <|eot_id|> literally.")),
    "assistant_with_think": _m(
        (U, "Hi"), (A, "<think>\nThe user greets me.\n</think>\n\nHello!"), (U, "Bye")
    ),
    "assistant_last": _m((U, "Say hi."), (A, "Hi!")),
    "system_only": _m((S, "You are a helpful assistant.")),
}
# Extra template variables for some cases (only for templates that read them).
KWARGS_CASES = {
    "llama3.1+": [
        ("system_user", {"date_string": "01 Jan 2025"}),
        ("user_only", {"date_string": "9 Feb 2026"}),
    ]
}


def render(
    template: str, special_tokens: dict, messages, add_generation_prompt: bool, **kwargs
) -> str:
    """What `tokenizer.apply_chat_template(messages, tokenize=False, ...)` returns for this
    template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template_kwargs = {**{k: v for k, v in special_tokens.items() if v is not None}, **kwargs}
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
    return rendered[0]


def fold_system(messages):
    """The leading system message at the head of the first user turn, followed by a blank line."""
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": system + "\n\n" + rest[0]["content"]}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def refuses_system(template: str, special: dict) -> bool:
    from jinja2.exceptions import TemplateError

    try:
        render(template, special, _m((S, "Be brief."), (U, "Hi")), True, enable_thinking=False)
    except TemplateError:
        render(template, special, _m((U, "Hi")), True, enable_thinking=False)  # must work
        return True
    return False


def make_case(template, special, conv, agp, kwargs, fold) -> dict:
    from jinja2.exceptions import TemplateError

    messages = CONVERSATIONS[conv]
    case = {"name": conv, "messages": messages, "add_generation_prompt": agp, "kwargs": kwargs}
    reference = fold_system(messages) if fold and messages[0]["role"] == "system" else messages
    if reference is not messages:
        case.update(reference_messages=reference, folded=True)
    try:
        case["text"] = render(template, special, reference, agp, **kwargs)
    except TemplateError as e:
        case["error"] = str(e)
    if "strftime_now" in template and "date_string" not in kwargs:
        case["frozen_now"] = FROZEN_NOW.isoformat()
    return case


class _FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN_NOW


def cases_for(template: str, special: dict) -> list[dict]:
    plan = [(conv, {"enable_thinking": False}) for conv in CONVERSATIONS]
    if "enable_thinking" in template:
        plan += [(conv, {"enable_thinking": True}) for conv in CONVERSATIONS]
    if "Cutting Knowledge Date" in template:
        plan += [(conv, {"enable_thinking": False, **kw}) for conv, kw in KWARGS_CASES["llama3.1+"]]
    fold = refuses_system(template, special)
    return [
        make_case(template, special, conv, agp, kwargs, fold)
        for conv, kwargs in plan
        for agp in (True, False)
    ]


def main():
    import jinja2
    import transformers
    from transformers.utils import chat_template_utils

    sources = json.loads((TEMPLATES / "SOURCES.json").read_text(encoding="utf-8"))
    names = sorted(k for k in sources if not k.startswith("_"))
    golden = {}
    real_datetime = chat_template_utils.datetime
    chat_template_utils.datetime = (
        _FrozenDatetime  # strftime_now() reads the clock through this name
    )
    try:
        for name in names:
            template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
            golden[name] = cases_for(template, sources[name]["special_tokens"])
    finally:
        chat_template_utils.datetime = real_datetime
    out = HERE / "chat_golden.json"
    out.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(
        f"wrote {out} ({sum(map(len, golden.values()))} cases; transformers "
        f"{transformers.__version__}, jinja2 {jinja2.__version__})"
    )


if __name__ == "__main__":
    main()
