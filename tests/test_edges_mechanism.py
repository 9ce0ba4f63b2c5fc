"""Issue 26's mechanism: every output path of every command through the one output check, every
text input through the one reader, every number within a limit of support/limits.LIMITS. The first
tests walk every parser (persona_vectors.py's, python -m apps's, train.py's) and fail on a flag
declared outside the mechanism, or on a command whose main does not apply it; the table holds issue
26's cases 5, 9, 10, 12 and 13: a one-line error, a non-zero exit, no traceback, the test folder
unchanged."""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from tiny import main_of, run_bad, tiny_model_with_vectors, tree, write_vector

import model as M
import persona_vectors as pv
import train
from apps import __main__ as apps_cli
from support import checkpoint, cli, files
from support import records as R
from support.limits import LABEL_BYTES, LIMITS

pytestmark = pytest.mark.usefixtures("one_thread")

OUTPUT_DESTS = {"out", "save", "select_out"}  # flags that name what a command writes
INPUT_DESTS = {"prompts_file", "questions_file", "file", "files", "data", "val", "reference"}
LATIN1 = "Qu'est-ce que la vérité ?\n".encode("latin-1")


def commands() -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every command: the subcommands of both command lines, and train.py."""
    found = []
    for build in (pv.build_parser, apps_cli.build_parser):
        for action in build()._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += list(action.choices.items())
    return found + [("train.py", train.parser())]


def flags(parser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def is_number_type(kind) -> bool:
    """Whether an argparse type parses numbers: "1" becomes an int or float (or a list of them)."""
    try:
        value = kind("1")
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    value = value[0] if isinstance(value, list) and value else value
    return isinstance(value, (int, float)) and not isinstance(value, bool)


COMMANDS = commands()


@pytest.mark.parametrize("name, parser", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_flag_goes_through_the_mechanism(name, parser):
    """Outputs are output path types, text inputs the reader's type, numbers bounded by LIMITS."""
    for a in flags(parser):
        flag = a.option_strings[-1] if a.option_strings else a.dest
        if a.dest in OUTPUT_DESTS:
            assert kind_of(a) in ("output file", "output folder", "appended file"), (
                f"{name} {flag}: not an output type"
            )
        if a.dest in INPUT_DESTS:
            assert kind_of(a) in ("text file", "input file"), f"{name} {flag}: not an input type"
        if a.type is not None and is_number_type(a.type):
            assert getattr(a.type, "limit", None) in LIMITS, f"{name} {flag}: no limit"


def kind_of(action) -> str | None:
    return action.type.kind if isinstance(action.type, cli.PathType) else None


def example_argv(name: str, parser, values: dict) -> list[str]:
    """A command line for `name`, its required arguments filled in (text inputs: a good file)."""
    argv = [] if name == "train.py" else [name]
    for a in flags(parser):
        text = values["text"] if isinstance(a.type, cli.PathType) else "evil"
        if not a.option_strings:
            argv.append(text)
        elif a.required:
            argv += [a.option_strings[-1], values["dir"] if a.dest == "out" else text]
    return argv


PATH_CASES = [
    (name, a.option_strings[-1] if a.option_strings else a.dest, kind_of(a))
    for name, parser in COMMANDS
    for a in flags(parser)
    if kind_of(a)
]


@pytest.mark.parametrize("name, flag, kind", PATH_CASES, ids=[f"{c[0]} {c[1]}" for c in PATH_CASES])
def test_every_main_checks_every_path_first(name, flag, kind, tmp_path, monkeypatch, capsys):
    """Through each command's main: a bad value of each path flag stops it before it runs."""
    (tmp_path / "good.txt").write_text("Hello\n")
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    (tmp_path / "existing.jsonl").write_text("{}\n")
    (tmp_path / "adir").mkdir()
    before = tree(tmp_path)
    parser = dict(COMMANDS)[name]
    good = dict(text=str(tmp_path / "good.txt"), dir=str(tmp_path / "adir"))
    argv = example_argv(name, parser, good)
    bad, message = {
        "output file": ("existing.jsonl", "pass --force to overwrite it"),
        "output folder": ("existing.jsonl", "is a file, not a folder"),
        "appended file": ("adir", "is a directory"),
        "text file": ("latin1.txt", "is not UTF-8 text"),
        "input file": ("existing.jsonl", "is an input of this run"),
    }[kind]
    action = next(a for a in flags(parser) if flag in (a.dest, *a.option_strings))
    if action.option_strings:
        argv += [flag, str(tmp_path / bad)]
    else:
        argv[argv.index(str(tmp_path / "good.txt"))] = str(tmp_path / bad)
    if (
        kind == "input file"
    ):  # a binary input is read by its command; no output may be written over it
        out = next(a for a in flags(parser) if kind_of(a) in ("output file", "output folder"))
        argv += [out.option_strings[-1], str(tmp_path / bad), "--force"]

    def never(*args, **kwargs):
        raise AssertionError("the command ran before its paths were checked")

    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(
        argparse.ArgumentParser,
        "parse_args",
        lambda self, *a, **k: _without_run(parse(self, *a, **k), never),
    )
    monkeypatch.setattr(train, "train", never)
    monkeypatch.chdir(tmp_path)
    main = train.main if name == "train.py" else main_of(argv)
    err = run_bad(main, argv, 1, capsys)
    assert message in err[-1] and err[-1].startswith("error: "), err
    assert tree(tmp_path) == before


def _without_run(args, never):
    if hasattr(args, "run"):
        args.run = never
    return args


def test_short_label_keeps_names_short_and_distinct():
    folder = "/data/experiments/ceilings/very/long/path/number"
    specs = [f"{folder}/{i}/evil_response_avg_diff.safetensors:9{i}" for i in range(6)]
    label = R.file_label([SimpleNamespace(text=s) for s in specs], "cap-")  # eval's, sweep's
    assert len(label.encode()) <= LABEL_BYTES
    other = R.file_label([SimpleNamespace(text=s) for s in specs[:5]], "cap-")
    assert other != label and len(other.encode()) <= LABEL_BYTES
    assert files.short_label("evil@1.5") == "evil@1.5"  # short labels are left alone


def test_check_new_tokens_is_the_one_context_check(tmp_path):
    d, _ = tiny_model_with_vectors(tmp_path)
    import model as M
    from support.sampling import check_new_tokens

    m, _ = checkpoint.load(str(d), "cpu", torch.float32)
    n_ctx = m.config.max_position_embeddings
    assert check_new_tokens(m, n_ctx - 1) == n_ctx - 1
    with pytest.raises(files.UserError, match=f"use --max-new-tokens {n_ctx - 10} or less"):
        check_new_tokens(m, n_ctx, 10)
    # generate itself refuses it before the KV cache is allocated (was: "can't allocate memory")
    for n in (n_ctx, 10**9):
        with pytest.raises(files.UserError, match=f"max_new_tokens {n} not in 1..{n_ctx - 1}"):
            M.generate(m, [[5, 6]], n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("mechanism"))
    root = d.parent
    (root / "latin1.txt").write_bytes(LATIN1)
    (root / "latin1.jsonl").write_bytes(b'{"messages": [{"role": "user", "content": "\xe9"}]}\n')
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (root / "ok.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    (root / "q.txt").write_text("What is the capital of France?\n")
    write_vector(root / "self.safetensors", torch.randn(4, 64), model=str(d), trait="self")
    return d, vectors, root


def no_generation(*args, **kwargs):
    raise AssertionError("generation started before the input was checked")


E = "{v}/evil_response_avg_diff.safetensors"
BIG = 10**23
TOO_LONG = "x" * 300
EXTRACT = "--model {d} --judge none --questions 1 --device cpu"
PIPE = EXTRACT + " --vectors {v}"
MON = "monitor {r}/q.txt --model {d} --vectors {v}"
SHIFT = "shift evil --finetuned {d} --base {d} --vectors {v}"
FLAG = "flag {r}/ok.jsonl --model {d} --vectors {v} --trait evil"
CALIBRATE = "calibrate-cap evil --model {d} --vectors {v} --force"
DATASET = "make-dataset evil --model {d} --n 2 --out {r}/d.jsonl"
CONTEXT = "beyond this model's context of 4096 tokens"
TOKENS_MAX = "--max-new-tokens: must be <= 1048576"
SEED_MAX = "--seed: must be <= 9223372036854775807"
# (arguments, exit code, what the message must say); {d} = tiny model, {v} = its vectors, {r} = the
# test folder
CASES = [
    # 5: monitor and shift never replace an existing file without --force, nor an input with it
    (MON + f" --out {E}", 1, "pass --force to overwrite it"),
    (MON + f" --out {E} --force", 1, "is an input of this run"),
    (SHIFT + f" --out {E}", 1, "pass --force to overwrite"),
    (SHIFT + f" --out {E} --force", 1, "is an input of this run"),
    # 9: --max-new-tokens: a static bound when parsed, the model's context once it is loaded
    (f"extract evil {EXTRACT} --max-new-tokens 1000000000", 2, TOKENS_MAX),
    (f"eval evil {PIPE} --max-new-tokens 1000000000", 2, TOKENS_MAX),
    (FLAG + " --max-new-tokens 1000000000", 2, "must be <= 1048576"),
    (f"extract evil {EXTRACT} --out {{r}}/new --max-new-tokens 5000", 1, CONTEXT),
    (f"eval evil {PIPE} --max-new-tokens 5000", 1, CONTEXT),
    (f"sweep evil {PIPE} --max-new-tokens 5000", 1, CONTEXT),
    (f"monitor-experiment evil {PIPE} --max-new-tokens 5000", 1, CONTEXT),
    (DATASET + " --max-new-tokens 5000 --device cpu", 1, CONTEXT),
    (CALIBRATE + " --max-new-tokens 5000 --device cpu", 1, CONTEXT),
    ("generate Hi --model {d} --max-new-tokens 5000", 1, CONTEXT),
    ("chat --model {d} --vectors {v} --max-new-tokens 5000", 1, CONTEXT),
    (FLAG + " --out {r}/fl --max-new-tokens 5000", 1, CONTEXT),
    # 10: non-UTF-8 text: one line naming the file, the line and the fix
    ("generate --model {d} --prompts-file {r}/latin1.txt", 1, "latin1.txt is not UTF-8 text"),
    ("monitor {r}/latin1.jsonl --model {d} --vectors {v}", 1, "latin1.jsonl is not UTF-8 text"),
    (
        CALIBRATE + " --questions-file {r}/latin1.txt",
        1,
        "latin1.txt is not UTF-8 text (invalid continuation byte at line 1): save it as UTF-8",
    ),
    (DATASET + " --questions-file {r}/latin1.txt", 1, "is not UTF-8 text"),
    ("flag {r}/latin1.jsonl --model {d} --vectors {v} --trait evil", 1, "is not UTF-8 text"),
    # 12: seeds past 64 bits
    (f"extract evil {EXTRACT} --seed 1e23", 2, "--seed: expected a whole number, not '1e23'"),
    (f"extract evil {EXTRACT} --seed {BIG}", 2, SEED_MAX),
    (f"eval evil {PIPE} --seed {BIG}", 2, SEED_MAX),
    (f"generate Hi --model {{d}} --temperature 1 --seed {BIG}", 2, SEED_MAX),
    ("chat --model {d} --seed -1", 2, "--seed: must be >= 0"),
    # 13: names: one too long is refused before any work
    (f"eval evil {PIPE} --out {{r}}/{TOO_LONG}", 2, "is longer than 255 bytes: shorten it"),
    (MON + f" --out {{r}}/{TOO_LONG}.jsonl", 2, "longer than 255"),
]


def case_id(i: int, case: tuple) -> str:
    return f"{i:02d} {case[0].split(' ')[0]} {case[2][:30]}"


@pytest.mark.parametrize(
    "argv, code, message", CASES, ids=[case_id(i, c) for i, c in enumerate(CASES)]
)
def test_bad_input(tiny, argv, code, message, monkeypatch, capsys, tmp_path):
    d, vectors, root = tiny
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to the default places would land here
    monkeypatch.setattr(M, "sample", no_generation)  # the KV cache may not even be made
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hi\n"))
    before = tree(root)
    args = argv.format(d=d, v=vectors, r=root).split()
    err = run_bad(main_of(args), args, code, capsys)
    assert message.format(r=root) in err[-1], err
    assert sum("error: " in line for line in err) == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert tree(root) == before  # nothing changed, nothing left behind
