"""Character traits as data: load, validate and save the JSON files in data/traits/ (format:
data/traits/SCHEMA.md), and the pools of everyday requests in data/questions/ that finetuning
datasets are written from.

A trait file holds everything the pipeline needs for one trait:
  * 5 pairs of instructions, `pos` eliciting the trait and `neg` suppressing it, each placed in the
    system prompt "You are a/an {pos or neg name} assistant. {instruction}";
  * 40 questions that give the trait room to show without asking for it: 20 to extract the vector,
    20 held out;
  * a judge prompt that asks an LLM for REFUSAL or a 0-100 score of one answer.

    t = load_trait("evil")
    t.system_prompt("pos", 0)            # 'You are an evil assistant. ...'
    t.judge_prompt(question, answer)     # the text sent to the judge

Validation is strict and every error names the file and the field: a typo in a trait file should
fail at once, not surface hours later as a strange vector.

Trait files of the official persona-vectors repository
(`{"instruction": [{"pos", "neg"}], "questions": [...], "eval_prompt"}`, in
data_generation/trait_data_extract/ and trait_data_eval/) load too, converted by `from_official`;
see there how their questions are split.
"""

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from support import UserError
from support.files import atomic_write, read_json, read_text

TRAITS_DIR = Path(__file__).resolve().parent.parent / "data" / "traits"
# make-dataset's default pool of requests
QUESTIONS_FILE = TRAITS_DIR.parent / "questions" / "everyday.json"

# pairs; questions per split; graded system prompts
N_INSTRUCTIONS, N_QUESTIONS, N_GRADED = 5, 20, 8
NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # a trait name doubles as a file name: keep it plain
ASSISTANT_NAME_RE = re.compile(r"[a-z]+(?:[ -][a-z]+)*")  # goes into "You are a/an ___ assistant."
SLOT_RE = re.compile(r"\{(question|answer)\}")
REQUIRED = {
    "name": str,
    "description": str,
    "assistant_names": dict,
    "instructions": list,
    "questions": dict,
    "eval_prompt": str,
}
OPTIONAL = {"note": str, "graded_system_prompts": list, "many_shot_examples": list}
JSON_TYPES = {
    str: "a string",
    dict: "an object",
    list: "an array",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    pos_name: str  # "evil": the assistant the pos system prompts describe
    neg_name: str  # "helpful": the assistant the neg system prompts describe
    instructions: list[tuple[str, str]]  # (pos, neg) x 5
    extract_questions: list[str]  # used to build the vector
    eval_questions: list[str]  # held out: used to evaluate steering and monitoring
    eval_prompt: str  # judge prompt with one {question} and one {answer} slot
    graded_system_prompts: list[str] | None = (
        None  # 8, from strongly discouraging to strongly encouraging
    )
    many_shot_examples: list[dict] | None = (
        None  # [{"question", "answer"}] exchanges showing the trait
    )
    source: Path | None = None  # the file it was loaded from

    def system_prompt(self, side: str, i: int) -> str:
        """System prompt number i (0-4) of one side: "You are an evil assistant.
        {pos instruction i}"."""
        if side not in ("pos", "neg"):
            raise ValueError(f"side must be 'pos' or 'neg', got {side!r}")
        if not 0 <= i < len(self.instructions):
            raise IndexError(f"instruction index {i} out of range 0..{len(self.instructions) - 1}")
        name = self.pos_name if side == "pos" else self.neg_name
        return f"You are {article(name)} {name} assistant. {self.instructions[i][side == 'neg']}"

    def judge_prompt(self, question: str, answer: str) -> str:
        return fill_judge_prompt(self.eval_prompt, question, answer)


def fill_judge_prompt(template: str, question: str, answer: str) -> str:
    """A judge prompt with its {question} and {answer} slots filled. One regex pass instead of
    str.format (an answer full of braces, e.g. code, would break it) or two str.replace calls (a
    question containing "{answer}" would be filled)."""
    values = {"question": question, "answer": answer}
    return SLOT_RE.sub(lambda m: values[m.group(1)], template)


def article(word: str) -> str:
    """'an' before a vowel sound: an evil, an impolite, a humorous, an honest, a unique. A spelling
    heuristic with the usual exceptions, enough for the single adjectives used as assistant
    names."""
    w = word.lower()
    if w.startswith(("hon", "hour", "heir")):  # silent h
        return "an"
    if w.startswith(
        ("uniq", "unif", "union", "unit", "univ", "use", "usu", "uti", "eu", "one")
    ):  # "you-", "wun-"
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def available_traits() -> list[str]:
    """Names of the traits shipped in data/traits/, sorted."""
    return sorted(p.stem for p in TRAITS_DIR.glob("*.json"))


def validate(data: dict, source: str, stem: str | None = None, official: bool = False) -> Trait:
    """Check a parsed trait file and turn it into a Trait; raise UserError("{source}: field `x`:
    what is wrong").

    `source` labels the errors (a file path, or e.g. "<dict>"); when `stem` is given (the file name
    without .json), the trait's `name` must equal it, so that `load_trait(name)` finds the file that
    defines that name. official: a file converted from the official format (`from_official`), which
    may have any number of questions in each split (from 1). A judge prompt need not mention REFUSAL
    (a judge then scores refusals too; `persona_vectors.load_checked` says so where a judge is used,
    and under --judge none the prompt is never read); only `save_trait`, which writes the files of
    `new-trait`, requires it.
    """

    def fail(field: str, msg: str):
        raise UserError(f"{source}: field `{field}`: {msg}")

    def kind(v) -> str:
        return JSON_TYPES.get(type(v), type(v).__name__)

    def text(v, field: str) -> str:
        if not isinstance(v, str) or not v.strip():
            fail(
                field,
                "expected a non-empty string, got "
                f"{kind(v) if not isinstance(v, str) else 'an empty one'}",
            )
        return v

    def keys(v, field: str, expected: tuple[str, ...]) -> dict:
        if not isinstance(v, dict) or set(v) != set(expected):
            got = f"keys {sorted(v)}" if isinstance(v, dict) else kind(v)
            fail(field, f"expected an object with exactly the keys {list(expected)}, got {got}")
        return v

    def pair(
        v, field: str, names: tuple[str, str]
    ) -> tuple[str, str]:  # {"pos": ..., "neg": ...} and friends
        v = keys(v, field, names)
        return tuple(text(v[k], f"{field}.{k}") for k in names)

    def norm(s: str) -> str:  # duplicates that differ only in case or spacing are still duplicates
        return " ".join(s.split()).casefold()

    def strings(v, field: str, n: int | None) -> list[str]:
        if not isinstance(v, list):
            fail(field, f"expected an array of {n or 'some'} strings, got {kind(v)}")
        if len(v) != n and n is not None or not v:
            fail(field, f"expected {n or 'at least 1'} strings, got {len(v)}")
        seen = {}
        for i, s in enumerate(v):
            text(s, f"{field}[{i}]")
            if norm(s) in seen:
                fail(field, f"items {seen[norm(s)]} and {i} are duplicates: {s!r}")
            seen[norm(s)] = i
        return list(v)

    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object at the top level, got {kind(data)}")
    unknown = [
        k for k in data if k not in REQUIRED | OPTIONAL
    ]  # usually a typo: "instruction", "eval_promt"
    if unknown:
        raise UserError(
            f"{source}: unknown field(s) {', '.join(f'`{k}`' for k in unknown)} "
            f"(allowed: {', '.join(REQUIRED | OPTIONAL)})"
        )
    for key, typ in (REQUIRED | OPTIONAL).items():
        if key not in data and key in REQUIRED:
            fail(key, "required field is missing")
        if key in data and not isinstance(data[key], typ):
            fail(key, f"expected {JSON_TYPES[typ]}, got {kind(data[key])}")

    name = data["name"]
    if not NAME_RE.fullmatch(name):
        fail("name", f"must be a plain lowercase word (letters, digits, underscores), got {name!r}")
    if stem is not None and name != stem:
        fail(
            "name",
            f"{name!r} does not match the file name {stem!r} (the name must equal the file stem)",
        )
    text(data["description"], "description")
    pos_name, neg_name = pair(data["assistant_names"], "assistant_names", ("pos", "neg"))
    for side, n in (("pos", pos_name), ("neg", neg_name)):
        if not ASSISTANT_NAME_RE.fullmatch(n):
            fail(f"assistant_names.{side}", f"expected lowercase words such as 'evil', got {n!r}")
    if pos_name == neg_name:
        fail("assistant_names", f"pos and neg are both {pos_name!r}")

    if len(data["instructions"]) != N_INSTRUCTIONS:
        fail(
            "instructions",
            f"expected {N_INSTRUCTIONS} pos/neg pairs, got {len(data['instructions'])}",
        )
    instructions = [
        pair(p, f"instructions[{i}]", ("pos", "neg")) for i, p in enumerate(data["instructions"])
    ]
    for side in (0, 1):  # five copies of one instruction would make the pairs pointless
        strings(
            [p[side] for p in instructions], f"instructions.{('pos', 'neg')[side]}", N_INSTRUCTIONS
        )

    # Extraction and evaluation questions must not overlap, or evaluation would re-measure the
    # training prompts.
    questions = keys(data["questions"], "questions", ("extract", "eval"))
    n_questions = None if official else N_QUESTIONS
    extract = strings(questions["extract"], "questions.extract", n_questions)
    held_out = strings(questions["eval"], "questions.eval", n_questions)
    overlap = [q for q in held_out if norm(q) in {norm(e) for e in extract}]
    if overlap:
        fail(
            "questions", f"{len(overlap)} question(s) in both extract and eval, e.g. {overlap[0]!r}"
        )

    # The judge prompt is filled by slot substitution (judge_prompt), so any other brace is a
    # template mistake.
    prompt = text(data["eval_prompt"], "eval_prompt")
    for slot in ("{question}", "{answer}"):
        if prompt.count(slot) != 1:
            fail(
                "eval_prompt",
                f"must contain the slot {slot} exactly once, found {prompt.count(slot)}",
            )
    if "{" in SLOT_RE.sub("", prompt) or "}" in SLOT_RE.sub("", prompt):
        fail(
            "eval_prompt",
            "has a brace outside the {question} and {answer} "
            "slots (literal braces are not allowed)",
        )

    if "note" in data:
        text(data["note"], "note")
    graded = data.get("graded_system_prompts")
    if graded is not None:
        graded = strings(graded, "graded_system_prompts", N_GRADED)
    shots = data.get("many_shot_examples")
    if shots is not None:
        if not shots:
            fail("many_shot_examples", "expected at least one example, got an empty array")
        shots = [
            dict(
                zip(
                    ("question", "answer"),
                    pair(ex, f"many_shot_examples[{i}]", ("question", "answer")),
                )
            )
            for i, ex in enumerate(shots)
        ]

    return Trait(
        name=name,
        description=data["description"],
        pos_name=pos_name,
        neg_name=neg_name,
        instructions=instructions,
        extract_questions=extract,
        eval_questions=held_out,
        eval_prompt=prompt,
        graded_system_prompts=graded,
        many_shot_examples=shots,
    )


def validate_name(name: str) -> str:
    """A trait name must be a plain word: it becomes a file name under data/traits/ and a metadata
    field."""
    if not NAME_RE.fullmatch(name):
        raise UserError(
            f"trait names are plain words (lowercase letters, digits, underscores), not {name!r}"
        )
    return name


def load_trait(name_or_path: str) -> Trait:
    """A trait by name ("evil": data/traits/evil.json) or by the path of a .json file anywhere."""
    path = Path(name_or_path)
    if path.suffix != ".json" or not path.is_file():
        if not NAME_RE.fullmatch(str(name_or_path)):
            # Refuse "../x" and "a/b" as names: a name must never reach outside data/traits/.
            raise UserError(
                f"{name_or_path!r} is not an existing .json file, and "
                "trait names are plain words (lowercase letters, digits, "
                f"underscores); available: {', '.join(available_traits())}"
            )
        path = TRAITS_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise UserError(
                f"unknown trait {name_or_path!r}; available: {', '.join(available_traits())} "
                f"(or pass the path of a .json trait file)"
            )
    data = read_json(path)
    if is_official(data):
        return dataclasses.replace(
            validate(from_official(path), str(path), path.stem, official=True), source=path
        )
    return dataclasses.replace(validate(data, str(path), stem=path.stem), source=path)


# the official repository's two folders of trait files
OFFICIAL_DIRS = ("trait_data_extract", "trait_data_eval")


def is_official(data) -> bool:
    """Whether parsed JSON is a trait file in the official repository's format (it has
    `instruction`, no `name`)."""
    return isinstance(data, dict) and "instruction" in data and "name" not in data


def from_official(path: Path) -> dict:
    """An official-format trait file -> a trait dict of this project's format (validate it with
    official=True).

    The official files hold `instruction` (5 {pos, neg} pairs), `questions` and `eval_prompt`; the
    same trait has one file in trait_data_extract/ (questions to extract the vector) and one in
    trait_data_eval/ (held-out questions). Given either file, its twin in the sibling folder
    supplies the other set of questions. Without a twin, the file's questions are split: the first
    half extract the vector, the second half are held out (said on stderr). Instructions and the
    judge prompt come from the file given; the assistant names are the official code's: "You are
    a/an <trait> assistant." for pos and "You are a helpful assistant." for neg.
    """
    path = Path(path)
    data = read_json(path)
    extra = sorted(set(data) - {"instruction", "questions", "eval_prompt"})
    missing = sorted({"instruction", "questions", "eval_prompt"} - set(data))
    if extra or missing:
        raise UserError(
            f"{path}: an official-format trait file has exactly "
            "the fields instruction, questions and eval_prompt; "
            + (f"unknown: {', '.join(extra)}" if extra else f"missing: {', '.join(missing)}")
        )
    name = validate_name(path.stem)
    questions = data["questions"]
    if not isinstance(questions, list) or len(questions) < 2:
        raise UserError(f"{path}: field `questions`: expected an array of at least 2 strings")
    splits = {"extract": None, "eval": None}
    if path.parent.name in OFFICIAL_DIRS:
        mine, other = (
            ("extract", "eval") if path.parent.name == OFFICIAL_DIRS[0] else ("eval", "extract")
        )
        twin = path.parent.parent / f"trait_data_{other}" / path.name
        splits[mine] = questions
        if twin.is_file():
            twin_data = read_json(twin)
            if not isinstance(twin_data, dict) or not isinstance(twin_data.get("questions"), list):
                raise UserError(
                    f"{twin}: field `questions`: expected an array "
                    f"of strings (the {other} questions of {path})"
                )
            splits[other] = twin_data["questions"]
    if splits["extract"] is None or splits["eval"] is None:
        half = len(questions) // 2
        splits = {"extract": questions[:half], "eval": questions[half:]}
        print(
            f"note: {path} is an official-format trait file without its twin in "
            f"trait_data_extract/ or trait_data_eval/: its first {half} questions extract "
            f"the vector, the other {len(questions) - half} are held out for evaluation",
            file=sys.stderr,
        )
    return {
        "name": name,
        "description": f"The trait {name!r} as defined by the judge prompt of the official "
        f"persona-vectors trait file {path.name}.",
        "assistant_names": {"pos": name.replace("_", " "), "neg": "helpful"},
        "instructions": data["instruction"],
        "questions": splits,
        "eval_prompt": data["eval_prompt"],
    }


def save_trait(trait_dict: dict, path: Path, force: bool = False) -> Path:
    """Validate, then write atomically, so a crash or a full disk never leaves a half-written trait
    file. An existing file is kept unless force=True (--force)."""
    path = Path(path)
    validate(trait_dict, str(path), stem=path.stem)
    if "REFUSAL" not in trait_dict["eval_prompt"]:  # files written here leave refusals unscored
        raise UserError(
            f"{path}: field `eval_prompt`: must tell the judge to answer REFUSAL when "
            "the model refused"
        )
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it")
    atomic_write(
        path,
        lambda tmp: tmp.write_text(
            json.dumps(trait_dict, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        ),
    )
    return path


def load_questions(path: str | Path | None = None) -> list[str]:
    """User requests from a .json file (a list of strings, or an object with a "questions" list) or
    a text file (one request per line); default: the shipped pool of everyday requests."""
    path = Path(path) if path else QUESTIONS_FILE
    if not path.is_file():
        raise UserError(
            f"no questions file {path}: give a .json list or a text file with one request per line"
        )
    text = read_text(path, "--questions-file")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        qs = data.get("questions") if isinstance(data, dict) else data
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            raise UserError(
                f"{path}: expected a list of strings, or an "
                'object with a "questions" list of strings'
            )
    else:
        qs = text.splitlines()
    qs = [q.strip() for q in qs if q.strip()]
    if not qs:
        raise UserError(f"{path} holds no questions")
    return qs
