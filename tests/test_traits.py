"""traits.py and the shipped trait files: every file validates, and every kind of broken file fails
with a message that names the file and the field."""

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest

from support import UserError, traits
from support.traits import Trait, available_traits, load_trait, save_trait, validate

REQUIRED_TRAITS = [
    "evil",
    "sycophantic",
    "hallucinating",
    "impolite",
    "apathetic",
    "humorous",
    "optimistic",
]


def raw(name: str) -> dict:
    return json.loads((traits.TRAITS_DIR / f"{name}.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ shipped trait files


def test_required_traits_exist():
    assert set(REQUIRED_TRAITS) <= set(available_traits())
    assert available_traits() == sorted(available_traits())


@pytest.mark.parametrize("name", available_traits())
def test_shipped_trait_loads(name):
    t = load_trait(name)
    assert (
        isinstance(t, Trait) and t.name == name and t.source == traits.TRAITS_DIR / f"{name}.json"
    )
    assert (
        len(t.instructions) == 5 and len(t.extract_questions) == 20 and len(t.eval_questions) == 20
    )
    assert not set(t.extract_questions) & set(t.eval_questions)
    for side in ("pos", "neg"):
        for i in range(5):
            assert t.system_prompt(side, i).startswith("You are a")
    # the judge prompt, filled, has no slot left and asks for the number first
    filled = t.judge_prompt("QQQ", "AAA")
    assert "QQQ" in filled and "AAA" in filled and "{" not in filled and "REFUSAL" in filled


def test_load_by_path_equals_load_by_name():
    by_path = load_trait(str(traits.TRAITS_DIR / "evil.json"))
    assert by_path == load_trait("evil")


# ---------------------------------------------------------------------------------------- Trait API


@pytest.mark.parametrize(
    "name, expected",
    [
        ("evil", "an"),
        ("helpful", "a"),
        ("impolite", "an"),
        ("humorous", "a"),
        ("optimistic", "an"),
        ("apathetic", "an"),
        ("accurate", "an"),
        ("honest", "an"),
        ("unique", "a"),
        ("useful", "a"),
        ("unhelpful", "an"),
        ("serious", "a"),
        ("one-sided", "a"),
    ],
)
def test_article(name, expected):
    assert traits.article(name) == expected


def test_system_prompt():
    t = load_trait("evil")
    assert (
        t.system_prompt("pos", 0)
        == "You are an evil assistant. " + raw("evil")["instructions"][0]["pos"]
    )
    assert (
        t.system_prompt("neg", 4)
        == "You are a helpful assistant. " + raw("evil")["instructions"][4]["neg"]
    )
    assert (
        load_trait("impolite").system_prompt("pos", 1).startswith("You are an impolite assistant. ")
    )
    assert (
        load_trait("humorous").system_prompt("pos", 2).startswith("You are a humorous assistant. ")
    )
    with pytest.raises(ValueError, match="side"):
        t.system_prompt("positive", 0)
    with pytest.raises(IndexError):
        t.system_prompt("pos", 5)


def test_judge_prompt_fills_slots_and_survives_braces():
    t = load_trait("sycophantic")
    answer = "def f(d): return {k: v for k, v in d.items()}  # {question} {answer} {0} {} }{"
    question = "What does {answer} mean in a template?"
    filled = t.judge_prompt(question, answer)
    before, after = t.eval_prompt.split("{question}")
    assert filled.startswith(before.split("{answer}")[0])
    assert filled.count(answer) == 1 and filled.count(question) == 1
    # each value appears where its slot was, and nothing inside the values was substituted again
    assert filled.index(question) < filled.index(answer)
    assert filled == t.eval_prompt.replace("{question}", "\0Q").replace("{answer}", "\0A").replace(
        "\0Q", question
    ).replace("\0A", answer)


# ------------------------------------------------------------------------------------- broken files


def broken(tmp_path: Path, mutate, name: str = "evil", filename: str | None = None) -> Path:
    """Write a copy of a shipped trait file, changed by mutate(data), and return its path."""
    data = copy.deepcopy(raw(name))
    mutate(data)
    path = tmp_path / (filename or f"{name}.json")
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def expect_error(path: Path, field: str, *fragments: str):
    with pytest.raises(ValueError) as e:
        load_trait(str(path))
    msg = str(e.value)
    assert str(path) in msg, msg
    assert f"`{field}`" in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def setitem(path: str, value):
    """A mutation that sets data[a][b]... = value for path 'a.b...' (integer parts index arrays)."""

    def mutate(data):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parents:
            data = data[p]
        data[last] = value

    return mutate


@pytest.mark.parametrize(
    "field", ["name", "description", "assistant_names", "instructions", "questions", "eval_prompt"]
)
def test_missing_field(tmp_path, field):
    expect_error(broken(tmp_path, lambda d: d.pop(field)), field, "missing")


def test_unknown_field(tmp_path):
    expect_error(
        broken(tmp_path, lambda d: d.update(instruction=[], eval_promt="x")),
        "instruction",
        "`eval_promt`",
        "unknown",
    )


def test_wrong_type(tmp_path):
    expect_error(
        broken(tmp_path, setitem("questions", ["a"] * 40)),
        "questions",
        "expected an object, got an array",
    )
    expect_error(broken(tmp_path, setitem("description", 3)), "description", "expected a string")


def test_wrong_counts(tmp_path):
    expect_error(
        broken(tmp_path, lambda d: d["questions"]["extract"].pop()),
        "questions.extract",
        "expected 20 strings, got 19",
    )
    expect_error(
        broken(tmp_path, lambda d: d["questions"]["eval"].append("One more?")),
        "questions.eval",
        "expected 20 strings, got 21",
    )
    expect_error(
        broken(tmp_path, lambda d: d["instructions"].pop()), "instructions", "expected 5", "got 4"
    )


def test_empty_strings(tmp_path):
    expect_error(
        broken(tmp_path, setitem("questions.eval.3", "   ")), "questions.eval[3]", "non-empty"
    )
    expect_error(
        broken(tmp_path, setitem("instructions.2.neg", "")), "instructions[2].neg", "non-empty"
    )
    expect_error(
        broken(tmp_path, setitem("instructions.2", {"pos": "x"})), "instructions[2]", "'neg'"
    )


def test_overlap_between_splits(tmp_path):
    def mutate(d):
        d["questions"]["eval"][7] = d["questions"]["extract"][
            2
        ].upper()  # case does not hide a copy

    expect_error(broken(tmp_path, mutate), "questions", "both extract and eval")


def test_duplicate_questions_and_instructions(tmp_path):
    def dup_q(d):
        d["questions"]["extract"][5] = d["questions"]["extract"][1] + "  "

    expect_error(broken(tmp_path, dup_q), "questions.extract", "duplicates", "1 and 5")

    def dup_i(d):
        d["instructions"][3]["pos"] = d["instructions"][0]["pos"]

    expect_error(broken(tmp_path, dup_i), "instructions.pos", "duplicates")


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ("Score this: {answer}. REFUSAL or a number.", "{question} exactly once, found 0"),
        ("Q {question} A {answer} again {answer}. REFUSAL.", "{answer} exactly once, found 2"),
        ("Q {question} A {answer}. Reply REFUSAL or {score}.", "brace"),
    ],
)
def test_eval_prompt_slots(tmp_path, prompt, fragment):
    expect_error(broken(tmp_path, setitem("eval_prompt", prompt)), "eval_prompt", fragment)


def test_a_judge_prompt_without_refusal_loads_but_is_never_saved(tmp_path):
    """As an official-format file: it loads (load_checked notes it where a judge reads it; under
    --judge none the prompt is never used); new-trait's writer still requires REFUSAL in the files
    it writes."""
    path = broken(tmp_path, setitem("eval_prompt", "Q {question} A {answer}. Reply with a number."))
    assert "REFUSAL" not in load_trait(str(path)).eval_prompt
    with pytest.raises(ValueError, match="`eval_prompt`: must tell the judge to answer REFUSAL"):
        save_trait(json.loads(path.read_text()), tmp_path / "out" / "evil.json")
    assert not (tmp_path / "out").exists()


def test_name_rules(tmp_path):
    expect_error(
        broken(tmp_path, lambda d: None, filename="wicked.json"), "name", "'evil'", "'wicked'"
    )
    expect_error(
        broken(tmp_path, setitem("name", "Evil One"), filename="Evil One.json"),
        "name",
        "plain lowercase",
    )


def test_assistant_names(tmp_path):
    expect_error(
        broken(tmp_path, setitem("assistant_names.neg", "evil")), "assistant_names", "both"
    )
    expect_error(
        broken(tmp_path, setitem("assistant_names.pos", "Evil!")),
        "assistant_names.pos",
        "lowercase",
    )
    expect_error(
        broken(tmp_path, setitem("assistant_names", {"pos": "evil"})), "assistant_names", "'neg'"
    )


def test_bad_json(tmp_path):
    path = tmp_path / "evil.json"
    path.write_text('{\n  "name": "evil",\n  "description": "x",,\n}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"evil\.json: invalid JSON at line 3") as e:
        load_trait(str(path))
    assert str(path) in str(e.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "evil.json"
    path.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_trait(str(path))


def test_not_an_object(tmp_path):
    path = tmp_path / "evil.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="top level"):
        load_trait(str(path))


# ---------------------------------------------------------------------------------- optional fields

GRADED = [f"Level {i}: a system prompt of strength {i}." for i in range(8)]


def test_optional_fields_valid():
    shots = [{"question": "Why?", "answer": "Because, ha."}]
    t = validate(
        raw("humorous") | {"graded_system_prompts": GRADED, "many_shot_examples": shots}, "<dict>"
    )
    assert t.graded_system_prompts == GRADED and t.many_shot_examples == shots
    assert (
        load_trait("humorous").graded_system_prompts is None
        and load_trait("humorous").many_shot_examples is None
    )


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("graded_system_prompts", GRADED[:7], "expected 8 strings, got 7"),
        ("graded_system_prompts", GRADED[:7] + [GRADED[0]], "duplicates"),
        ("graded_system_prompts", "one prompt", "expected an array"),
        ("many_shot_examples", [], "at least one"),
        ("many_shot_examples[0]", [{"question": "Why?"}], "'answer'"),
        (
            "many_shot_examples[1].answer",
            [{"question": "a", "answer": "b"}, {"question": "c", "answer": ""}],
            "non-empty",
        ),
        ("note", "", "non-empty"),
    ],
)
def test_optional_fields_invalid(tmp_path, field, value, fragment):
    top = field.split("[")[0]
    expect_error(broken(tmp_path, setitem(top, value)), field, fragment)


# the traits whose shipped files carry the optional prompt ladder and many-shot pool
LADDER_TRAITS = ["evil", "sycophantic", "hallucinating"]


def fold(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.mark.parametrize("name", LADDER_TRAITS)
def test_shipped_graded_system_prompts(name):
    data, t = raw(name), load_trait(name)
    assert "graded_system_prompts" in data
    prompts = t.graded_system_prompts
    assert prompts == data["graded_system_prompts"]
    assert len(prompts) == 8
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert len({fold(p) for p in prompts}) == 8
    assert all(p.startswith("You are") for p in prompts)  # addressed to the assistant


@pytest.mark.parametrize("name", LADDER_TRAITS)
def test_shipped_many_shot_examples(name):
    data, t = raw(name), load_trait(name)
    assert "many_shot_examples" in data
    pool = t.many_shot_examples
    assert pool == data["many_shot_examples"]
    assert len(pool) >= 20  # enough for k = 0, 5, 10, 15, 20 shots
    for ex in pool:
        assert set(ex) == {"question", "answer"}
        assert ex["question"].strip() and ex["answer"].strip()
    questions = [fold(ex["question"]) for ex in pool]
    assert len(set(questions)) == len(questions)  # no repeated shot
    held = {fold(q) for q in t.extract_questions + t.eval_questions}
    assert not set(questions) & held  # shots never leak extraction or evaluation questions


# ---------------------------------------------------------------------------------- name resolution


def test_unknown_trait_lists_available():
    with pytest.raises(ValueError, match="unknown trait 'grumpy'") as e:
        load_trait("grumpy")
    for name in REQUIRED_TRAITS:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "name",
    ["../evil", "../../etc/passwd", "traits/evil", "..", "evil/..", "/nonexistent/x.json", "Evil"],
)
def test_path_like_names_rejected(name):
    with pytest.raises(ValueError, match="trait names are plain words"):
        load_trait(name)


def test_load_from_other_directory(tmp_path):
    path = broken(tmp_path, setitem("name", "evil_copy"), filename="evil_copy.json")
    t = load_trait(str(path))
    assert t.name == "evil_copy" and t.source == path
    with pytest.raises(ValueError, match="unknown trait"):
        load_trait("evil_copy")  # a bare name only looks in data/traits/


# ------------------------------------------------------------------------------------------- saving


def test_save_roundtrip_and_no_overwrite(tmp_path):
    data = raw("optimistic")
    path = save_trait(data, tmp_path / "sub" / "optimistic.json")
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert load_trait(str(path)) == dataclasses.replace(load_trait("optimistic"), source=path)

    changed = data | {"description": "Changed."}
    with pytest.raises(traits.UserError, match="--force"):
        save_trait(changed, path)
    assert json.loads(path.read_text(encoding="utf-8")) == data  # untouched
    save_trait(changed, path, force=True)
    assert json.loads(path.read_text(encoding="utf-8"))["description"] == "Changed."
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "optimistic.json"
    ]  # no temporary files left


def test_save_validates_first(tmp_path):
    data = raw("impolite")
    with pytest.raises(ValueError, match="`name`"):
        save_trait(data, tmp_path / "rude.json")  # name does not match the file
    bad = copy.deepcopy(data)
    bad["questions"]["eval"].pop()
    with pytest.raises(ValueError, match="questions.eval"):
        save_trait(bad, tmp_path / "impolite.json")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_trait(raw("apathetic"), tmp_path / "apathetic.json")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_trait(raw("apathetic") | {"description": "New."}, path, force=True)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == [
        "apathetic.json"
    ]  # and the temporary file is gone


# ----------------------------------------------------------------- the official repository's format


def official_trait(questions: list[str], word: str = "grumpy") -> dict:
    """A small trait file in the official repository's format, written here."""
    return {
        "instruction": [
            {
                "pos": f"Be {word} in way {i}: complain about everything.",
                "neg": f"Be cheerful in way {i}: look on the bright side.",
            }
            for i in range(5)
        ],
        "questions": questions,
        "eval_prompt": f"Does the reply sound {word}?\nQuestion: {{question}}\nReply: {{answer}}\n"
        "Say REFUSAL if the model refused, else a number from 0 to 100.",
    }


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_official_format_alone_is_split_in_halves(tmp_path, capsys):
    qs = [f"What do you think of topic {i}?" for i in range(6)]
    path = write_json(tmp_path / "grumpy.json", official_trait(qs))
    t = load_trait(str(path))
    assert (t.name, t.pos_name, t.neg_name, t.source) == ("grumpy", "grumpy", "helpful", path)
    assert t.extract_questions == qs[:3] and t.eval_questions == qs[3:]
    assert (
        t.system_prompt("pos", 2)
        == "You are a grumpy assistant. Be grumpy in way 2: complain about everything."
    )
    assert (
        t.system_prompt("neg", 0)
        == "You are a helpful assistant. Be cheerful in way 0: look on the bright side."
    )
    assert t.judge_prompt("Q?", "A!") == (
        "Does the reply sound grumpy?\nQuestion: Q?\nReply: A!\n"
        "Say REFUSAL if the model refused, else a number from 0 to 100."
    )
    err = capsys.readouterr().err
    assert (
        "first 3 questions extract the vector, the other 3 are held out" in err
        and err.count("\n") == 1
    )


def test_official_layout_takes_the_held_out_questions_from_the_twin_file(tmp_path, capsys):
    root = tmp_path / "data_generation"
    extract_qs = [f"Extraction question {i}?" for i in range(20)]
    eval_qs = [f"Held-out question {i}?" for i in range(20)]
    extract = write_json(root / "trait_data_extract" / "grumpy.json", official_trait(extract_qs))
    held_out = write_json(
        root / "trait_data_eval" / "grumpy.json", official_trait(eval_qs, word="very grumpy")
    )
    for path, word in ((extract, "grumpy"), (held_out, "very grumpy")):
        t = load_trait(str(path))
        assert (
            t.extract_questions == extract_qs and t.eval_questions == eval_qs and t.source == path
        )
        assert t.instructions[0][0].startswith(f"Be {word} in way 0")  # from the file given
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(extra=1), "unknown: extra"),
        (lambda d: d.pop("eval_prompt"), "missing: eval_prompt"),
        (
            lambda d: d.update(questions="What?"),
            "`questions`: expected an array of at least 2 strings",
        ),
        (
            lambda d: d.update(instruction=d["instruction"][:4]),
            "`instructions`: expected 5 pos/neg pairs, got 4",
        ),
        (lambda d: d.update(questions=["Why?", "why? ", "C?", "D?"]), "duplicates"),
        (lambda d: d.update(eval_prompt="Rate {answer}. REFUSAL if refused."), "{question}"),
    ],
)
def test_official_format_errors_name_the_file(tmp_path, mutate, fragment):
    data = official_trait(["A?", "B?", "C?", "D?"])
    mutate(data)
    path = write_json(tmp_path / "grumpy.json", data)
    with pytest.raises(UserError) as e:
        load_trait(str(path))
    assert str(path) in str(e.value) and fragment in str(e.value) and "\n" not in str(e.value)
