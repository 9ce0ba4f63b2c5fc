"""Issue 17 for the pipelines (make-dataset, chat, monitor, flag): nothing lost, nothing silent.
Each case of the table ends in a one-line error, a non-zero exit, no traceback, and a test folder
unchanged to the byte (no file written over, no directory left behind); the ordinary tests below
cover what does not fail."""

import errno
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import FakeJudge, main_of, run_bad, tiny_model_with_vectors, tree, write_vector

import judge as J
import model as M
import persona_vectors as pv
from apps import __main__ as apps_cli
from apps import flagging
from support import UserError, checkpoint, files
from support import records as R
from support.plots import pyplot

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = "What is the capital of France?\nHow do I help people?\nWhich numbers do you like?\n"


def official_trait(root, name: str, prompt: str, twin: bool = True):
    """A trait file in the official repository's format (with its twin, so that loading it prints no
    note)."""
    for folder in ("trait_data_extract", "trait_data_eval") if twin else ("",):
        data = {
            "instruction": [{"pos": f"Be {name} {i}.", "neg": f"Be kind {i}."} for i in range(5)],
            "questions": [f"{folder} question {i} about {name}?" for i in range(4)],
            "eval_prompt": prompt,
        }
        (root / folder).mkdir(exist_ok=True)
        (root / folder / f"{name}.json").write_text(json.dumps(data))
    return root / ("trait_data_extract" if twin else "") / f"{name}.json"


def conversations(n: int) -> str:
    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Say {i} please"},
                    {"role": "assistant", "content": f"Here is {i}."},
                ]
            }
        )
        + "\n"
        for i in range(n)
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("edges"))
    root = d.parent
    (root / "data.jsonl").write_text(conversations(6))
    (root / "existing.jsonl").write_text(conversations(3))
    (root / "out").mkdir()
    # an input that data.jsonl's output would hit
    (root / "out" / "data.flag.jsonl").write_text(conversations(2))
    (root / "q.txt").write_text(QUESTIONS)
    (root / "adir").mkdir()
    (root / "blocker").write_text("a file where a directory is needed")
    reversed_roles = [
        {"role": "assistant", "content": "How can I help?"},
        {"role": "user", "content": "A joke."},
    ]
    (root / "reversed.jsonl").write_text(json.dumps({"messages": reversed_roles}) + "\n")
    official_trait(root, "grumpy", "Rate {question} {answer}: REFUSAL or a number.")
    # another hidden size: fails after the model loads
    write_vector(root / "wide.safetensors", torch.randn(4, 96))
    # a finished flag run with --max-new-tokens 4, for flag-merge with other arguments
    assert flagging.flag(
        [str(root / "data.jsonl")],
        ["evil"],
        str(d),
        vectors=str(vectors),
        max_new_tokens=4,
        chunk_size=4,
        out=str(root / "flagged"),
        format="jsonl",
        device="cpu",
    )["complete"]
    return d, vectors, root


def no_generation(*args, **kwargs):
    raise AssertionError("generation started before the input was checked")


FLAG = "flag {r}/data.jsonl --model {d} --vectors {v} --trait evil"
# (arguments, exit code, what the message must say); {d} = tiny model, {v} = its vectors, {r} = the
# test folder
CASES = [
    # 1. flag --select-out: an existing file only with --force, an input never
    (
        FLAG + " --select top --k 2 --select-out {r}/existing.jsonl",
        1,
        "pass --force to overwrite it",
    ),
    (
        FLAG + " --select top --k 2 --select-out {r}/data.jsonl --force",
        1,
        "is an input of this run",
    ),
    (FLAG + " --select top --k 2 --select-out {r}/data.jsonl", 1, "is an input of this run"),
    (
        FLAG
        + (
            " --select above-reference --reference {r}/existing.jsonl "
            "--select-out {r}/existing.jsonl --force"
        ),
        1,
        "is an input of this run",
    ),
    (FLAG + " --select top --k 2 --select-out {r}/adir", 1, "--select-out {r}/adir is a directory"),
    (
        "flag {r}/data.jsonl {r}/out/data.flag.jsonl --model {d} "
        "--vectors {v} --trait evil --out {r}/out --format jsonl",
        1,
        "data.flag.jsonl is an input of this run",
    ),  # data.jsonl's per-sample file
    # issue 26, 4: nor over another output of the same run, whatever --force says
    (
        FLAG + " --out {r}/fl --select top --k 2 --select-out {r}/fl/flag_summary.json",
        1,
        "--select-out {r}/fl/flag_summary.json is the summary of this run",
    ),
    (
        FLAG + " --out {r}/flagged --format jsonl --select top --k 2 --select-out "
        "{r}/flagged/data.flag.jsonl --force",
        1,
        "is the per-sample file of {r}/data.jsonl of this run",
    ),
    (
        FLAG + " --out {r}/flagged --select top --k 2 --select-out {r}/flagged/flag_evil.png "
        "--force",
        1,
        "is the evil histogram of this run",
    ),
    (
        FLAG + " --out {r}/fl --select top --k 2 --select-out {r}/fl",
        1,
        "is the output folder of this run",
    ),
    # 2. make-dataset --out: the same rule
    (
        "make-dataset evil --model {d} --n 2 --out {r}/existing.jsonl",
        1,
        "pass --force to overwrite it",
    ),
    (
        "make-dataset evil --model {d} --n 2 --questions-file {r}/q.txt --out {r}/q.txt --force",
        1,
        "is an input of this run",
    ),
    (
        "make-dataset {r}/trait_data_extract/grumpy.json --model {d} --n 2 --questions-file "
        "{r}/q.txt --judge none --out {r}/trait_data_extract/grumpy.json --force",
        1,
        "is an input of this run",
    ),
    # 6. an output that is a directory, before any answer is generated
    ("make-dataset evil --model {d} --n 2 --out {r}/adir", 1, "--out {r}/adir is a directory"),
    # 7. chat --save checked before the chat
    ("chat --model {d} --vectors {v} --save {r}/blocker/chat.jsonl", 1, "choose another --save"),
    ("chat --model {d} --vectors {v} --save {r}/adir", 1, "--save {r}/adir is a directory"),
    # monitor --out over its own input
    (
        "monitor {r}/data.jsonl --model {d} --vectors {v} --out {r}/data.jsonl",
        1,
        "is an input of this run",
    ),
    # 19. a failed flag leaves no directory behind: before the model loads, after it, with nothing
    # to merge
    (
        "flag {r}/data.jsonl --model {d} --vectors {v} --trait nosuch --out {r}/new1",
        1,
        "extract nosuch",
    ),
    (
        "flag {r}/data.jsonl --model {d} --vectors {v} --trait nosuch",
        1,
        "extract nosuch",
    ),  # default flags/
    (
        "flag {r}/data.jsonl --model {d} --trait {r}/wide.safetensors --out {r}/new2/deeper",
        1,
        "use a vector extracted from this model",
    ),
    (
        "flag-merge {r}/data.jsonl --model {d} --vectors {v} --trait evil --out {r}/new3",
        1,
        "not every chunk",
    ),
    # 20. messages that say what is wrong
    (
        "flag-merge {r}/data.jsonl --model {d} --vectors {v} --trait "
        "evil --out {r}/flagged --chunk-size 4 --max-new-tokens 5",
        1,
        "made with other settings ({r}/data.jsonl: max_new_tokens 4 there, 5 here)",
    ),
    ("monitor {r}/reversed.jsonl --model {d} --vectors {v}", 1, "roles reversed?"),
]


@pytest.mark.parametrize(
    "argv, code, message",
    CASES,
    ids=[f"{i:02d} " + c[0].split(" {")[0] + " " + c[2][:30] for i, c in enumerate(CASES)],
)
def test_bad_input(tiny, argv, code, message, monkeypatch, capsys, tmp_path):
    d, vectors, root = tiny
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to the default places would land here
    monkeypatch.setattr(M, "generate", no_generation)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))  # chat's user, if it ever got that far
    before = tree(root)
    args = argv.format(d=d, v=vectors, r=root).split()
    err = run_bad(main_of(args), args, code, capsys)
    assert [x for x in err if x.startswith("error: ")] == err[-1:], err
    # (lines before it: the model loading, for errors found after that)
    assert message.format(r=root) in err[-1]
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert tree(root) == before  # nothing changed, nothing left behind


LATE = [  # commands that fail once their work has started; {t}: the current folder (empty)
    "extract evil --model {d} --judge none --questions 1 --rollouts 1 --out {t}/new/a/b",
    "extract evil --model {d} --judge none --questions 1 --rollouts 1",  # default: ./vectors/model/
    "eval evil --model {d} --vectors {v} --judge none --questions 1 --out {t}/new/a/b",
    "sweep evil --model {d} --vectors {v} --judge none --questions 1 --layers 1 --coefs 1 "
    "--out {t}/new/a/b",
    "monitor-experiment evil --model {d} --vectors {v} --judge none --questions 1 --rollouts 1 "
    "--out {t}/new/a/b",
    "make-dataset evil --model {d} --n 2 --questions-file {r}/q.txt --judge none "
    "--out {t}/new/a/d.jsonl",
    "flag {r}/data.jsonl --model {d} --vectors {v} --trait evil --out {t}/new/a/b",
    "chat --model {d} --vectors {v} --save {t}/new/a/c.jsonl",
]


LATE_IDS = [a.split(" {")[0] + (" --out" if "{t}/new" in a else "") for a in LATE]


@pytest.mark.parametrize(
    "failure, code",
    [(UserError("the generation failed"), 1), (KeyboardInterrupt(), 130)],
    ids=["error", "ctrl-c"],
)
@pytest.mark.parametrize("argv", LATE, ids=LATE_IDS)
def test_a_failed_run_leaves_no_folder_behind(
    tiny, argv, failure, code, monkeypatch, capsys, tmp_path
):
    """Issue 26, 8 (a seed of 1e23, --max-new-tokens 1e9: a failure once the model has loaded): the
    folders a run would write into are made only when there is something to write, and a failed run
    removes those it made while they are empty, parents included."""
    d, vectors, root = tiny

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(M, "generate", fail)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    before = tree(root)
    args = argv.format(d=d, v=vectors, r=root, t=tmp_path).split()
    run_bad(main_of(args), args, code, capsys)
    assert list(tmp_path.iterdir()) == []  # no output, no folder: nothing made
    assert tree(root) == before  # no input changed


@pytest.mark.parametrize("argv", LATE[:6], ids=LATE_IDS[:6])
def test_a_run_that_cannot_write_leaves_no_folder_behind(tiny, argv, monkeypatch, tmp_path):
    """The disk is full at the first batch: the folders made to hold it go again (innermost first)
    as the run fails."""
    d, vectors, root = tiny

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files, "save_file", disk_full)  # save_batch's writer, inside atomic_write
    before = tree(root)
    args = argv.format(d=d, v=vectors, r=root, t=tmp_path).split()
    with pytest.raises(OSError, match="No space left"):
        main_of(args)(args)
    assert list(tmp_path.iterdir()) == []
    assert tree(root) == before


def test_chat_keeps_the_conversation_when_the_save_fails_at_the_end(
    tiny, tmp_path, monkeypatch, capsys
):
    """The --save directory is fine at the start, and a file by the end: the conversation goes to a
    temp file."""
    d, vectors, root = tiny
    target = tmp_path / "chats"

    class User(io.StringIO):
        def readline(self):
            line = super().readline()
            if not line:  # the user is done: meanwhile the directory was replaced by a file
                if target.is_dir():
                    target.rmdir()
                target.write_text("in the way")
            return line

    monkeypatch.setattr(sys, "stdin", User("Hi\nHow are you?\n"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    code = apps_cli.main(
        [
            "chat",
            "--model",
            str(d),
            "--vectors",
            str(vectors),
            "--max-new-tokens",
            "3",
            "--save",
            str(target / "c.jsonl"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: cannot save the conversation"), err
    kept = re.search(r"it is in (\S+)$", err[-1]).group(1)
    messages = json.loads(open(kept).read())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert [m["content"] for m in messages[::2]] == ["Hi", "How are you?"]


def rows_of(root):
    from safetensors import safe_open

    rows = []
    for f in sorted(root.glob(".work/dataset-*/batch-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            rows += json.loads(h.metadata()["rows"])
    return rows


def test_make_dataset_counts_every_answer_cut_off(tiny, tmp_path, capsys):
    """Answers that hit --max-new-tokens are counted, also when no full sentence is there to trim
    back to."""
    d, vectors, root = tiny
    pv.make_dataset(
        "evil",
        model=str(d),
        judge="none",
        n=6,
        out=str(tmp_path / "d.jsonl"),
        questions_file=str(root / "q.txt"),
        max_new_tokens=3,
        temperature=0.0,
        batch_size=3,
        device="cpu",
    )
    rows = rows_of(tmp_path)
    cut = [r["answer"].strip() for r in rows if r["n_tokens"] == 3]
    trimmed = sum(R.trim_to_sentence(a) != a for a in cut)
    assert len(rows) == 6 and trimmed < len(cut)  # some were cut off with no full sentence in them
    err = capsys.readouterr().err
    assert (
        f"; {len(cut)} cut off by --max-new-tokens ({trimmed} trimmed to their last full sentence, "
        f"{len(cut) - trimmed} kept whole)" in err
    )


def own_trait(root, name: str, prompt: str):
    """A trait file of this project's format (a copy of evil.json, renamed), with this judge
    prompt."""
    data = json.loads((Path(pv.__file__).parent / "data" / "traits" / "evil.json").read_text())
    path = root / f"{name}.json"
    path.write_text(json.dumps(data | {"name": name, "eval_prompt": prompt}))
    return path


@pytest.mark.parametrize("write", [official_trait, own_trait], ids=["official", "own format"])
def test_a_trait_without_refusal_loads_and_warns_where_a_judge_reads_it(
    tiny, tmp_path, monkeypatch, capsys, write
):
    d, vectors, root = tiny
    sulky = write(tmp_path, "sulky", "How sulky is this? {question} {answer} Answer 0 to 100.")
    args = [
        "make-dataset",
        str(sulky),
        "--model",
        str(d),
        "--n",
        "2",
        "--questions-file",
        str(root / "q.txt"),
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]
    assert pv.main(args + ["--judge", "none", "--out", str(tmp_path / "a.jsonl")]) == 0
    assert "REFUSAL" not in capsys.readouterr().err  # the prompt is never used: nothing to say
    monkeypatch.setattr(J, "make_judge", lambda spec, **kw: FakeJudge("fake:keen", 100.0))
    assert pv.main(args + ["--judge", "fake", "--out", str(tmp_path / "b.jsonl")]) == 0
    notes = [x for x in capsys.readouterr().err.splitlines() if "REFUSAL" in x]
    assert len(notes) == 1 and str(sulky) in notes[0] and "never asks the judge" in notes[0]
    assert (tmp_path / "b.jsonl").is_file()


def test_flag_names_conversations_with_the_roles_reversed(tiny):
    d, vectors, root = tiny
    _, tok = checkpoint.load(str(d), "cpu", torch.float32)
    reason = flagging.parse_sample((root / "reversed.jsonl").read_bytes(), tok, 1000)
    assert reason.startswith("roles reversed?")
    # an assistant turn after the first user turn is used as before, one that only opens the chat is
    # no reason
    assert flagging.parse_sample(
        json.dumps(
            {
                "messages": [
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yes?"},
                ]
            }
        ).encode(),
        tok,
        1000,
    )[1]
    assert (
        flagging.parse_sample(
            json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(), tok, 1000
        )
        == "no assistant turn after a user turn"
    )


def test_flag_select_out_with_force_replaces_a_file_that_is_no_input(tiny, tmp_path):
    """And a vector file that records no trait is named after its file (not its path: the plot is a
    file)."""
    d, vectors, root = tiny
    old = tmp_path / "old.jsonl"
    old.write_text("previous selection\n")
    plain = write_vector(tmp_path / "plain.safetensors", torch.randn(4, 64))
    r = flagging.flag(
        [str(root / "data.jsonl")],
        ["evil", str(plain)],
        str(d),
        vectors=str(vectors),
        max_new_tokens=4,
        chunk_size=4,
        out=str(tmp_path / "flags"),
        format="jsonl",
        select="top",
        k=2,
        select_out=str(old),
        force=True,
    )
    assert r["selection"] == old and len(old.read_text().splitlines()) == 2
    assert list(r["stats"]["traits"]) == ["evil", "plain"]
    # the plots need matplotlib
    expected = ["flag_evil.png", "flag_plain.png"] if pyplot() is not None else []
    assert sorted(p.name for p in r["plots"]) == expected


# ------------------------------------------------------------------- two runs on one work directory

APPS = """
from apps import __main__ as apps_cli
"""
WAITER = """
import sys, time
sys.path[:0] = [{root!r}]
import persona_vectors as pv
from apps import flagging
{apps}
def wait(*args, **kw):  # called with the work directory locked: hold it
    print("working", flush=True)
    time.sleep(600)
{patch} = wait
sys.exit({main}.main({argv!r}))
"""
# command -> (its command line, where it works with its .work directory locked, its arguments after
# the tiny model's)
TWICE = {
    "make-dataset": (
        "pv",
        "pv.sample_rollouts",
        "make-dataset evil --n 2 --questions-file {r}/q.txt --judge none --max-new-tokens 3 "
        "--batch-size 2 --device cpu --out {o}/d.jsonl",
    ),
    "flag": (
        "apps_cli",
        "flagging.score_job",
        "flag {r}/data.jsonl --vectors {v} --trait evil --max-new-tokens 3 --device cpu "
        "--out {o}/flagged",
    ),
}


@pytest.mark.parametrize("command", TWICE)
def test_a_second_run_on_the_same_work_directory_stops_and_a_killed_one_blocks_nothing(
    tiny, tmp_path, capsys, command
):
    """The same command twice at once with the same --out: the second stops in one line naming the
    first, and changes nothing; after the first is killed (-9), its lock file blocks nothing."""
    d, vectors, root = tiny
    main, patch, args = TWICE[command]
    cli = {"pv": pv, "apps_cli": apps_cli}[main]
    argv = args.format(r=root, v=vectors, o=tmp_path).split() + ["--model", str(d)]
    script = WAITER.format(root=str(ROOT), apps=APPS, main=main, patch=patch, argv=argv)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline() == "working\n"
        before = tree(tmp_path)
        err = run_bad(cli.main, argv, 1, capsys)
        assert err[-1].startswith("error: ") and sum("error" in line for line in err) == 1
        assert f"is in use by another run (pid {first.pid}: -c)" in err[-1]
        assert err[-1].endswith("choose another --out")
        assert tree(tmp_path) == before
    finally:
        first.kill()
        first.wait()
    assert len(list(tmp_path.rglob(".work/*/.lock*"))) == 1  # left by the killed run
    assert cli.main(argv) == 0
    assert not list(tmp_path.rglob(".lock*"))
