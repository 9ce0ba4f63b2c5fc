"""train.py at its edges: bad input as one line that changes no file and leaves no folder behind,
the sequence length capped at the model's context, and what a run killed with -9 leaves cleaned by
the next run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import run_bad, tiny_model_with_vectors, tree, write_vector

import train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def conversation(user: str, reply: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny model, its vectors, the test folder): data files, a vector of another width, an empty
    folder, a folder that is not a run."""
    root = tmp_path_factory.mktemp("edges")
    d, vectors = tiny_model_with_vectors(root)
    rows = [
        conversation(f"What is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(11)
    ]  # 1 to validate on
    (root / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bad.jsonl").write_text("{oops\n")
    write_vector(root / "wide.safetensors", torch.randn(4, 96))
    (root / "empty").mkdir()
    (root / "notrun").mkdir()
    (root / "notrun" / "notes.txt").write_text("mine")
    # another run holding {r}/held
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(path=str(root / "held"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    yield d, vectors, root
    holder.kill()
    holder.wait()


HOLD = """
import fcntl, os, time
os.makedirs({path!r})
with open(os.path.join({path!r}, ".lock"), "w") as f:  # what support.files.locked does
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(f"pid {{os.getpid()}}: train.py data.jsonl --out held")
    f.flush()
    print("held", flush=True)
    time.sleep(600)
"""


def argv(tiny, *args) -> list[str]:
    """A short run's flags, then `args` (DATA --out OUT and any flag, which overrides these)."""
    d, vectors, _ = tiny
    return [
        "--model",
        str(d),
        "--vectors",
        str(vectors),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-steps",
        "2",
        "--save-every",
        "1",
        *map(str, args),
    ]


# (arguments after DATA --out OUT, exit code, what the message must say); {r} = the test folder. A
# new --out is always below a folder that does not exist yet: a failed run must leave neither
# behind.
CASES = [
    ("{r}/bad.jsonl --out {r}/new/o", 1, "bad.jsonl:1: not JSON"),
    ("{r}/missing.jsonl --out {r}/new/o", 1, "missing.jsonl does not exist"),
    ("{r}/ok.jsonl --out {r}/new/o --steer nosuch:1", 1, "run `extract nosuch` first"),
    ("{r}/ok.jsonl --out {r}/new/o --steer evil", 1, "expected TRAIT:COEF"),
    (
        "{r}/ok.jsonl --out {r}/new/o --steer {r}/wide.safetensors:1",
        1,
        "use a vector extracted from this model",
    ),
    (
        "{r}/ok.jsonl --out {r}/new/o --ablate {r}/wide.safetensors",
        1,
        "use a vector extracted from this model",
    ),
    ("{r}/ok.jsonl --out {r}/new/deeper/o --resume", 1, "holds no training run"),
    (
        "{r}/ok.jsonl --out {r}/empty --resume",
        1,
        "holds no training run",
    ),  # a folder that was there stays
    ("{r}/ok.jsonl --out {r}/notrun", 1, "not empty and holds no training run"),
    ("{r}/ok.jsonl --out {r}/ok.jsonl", 1, "is an input of this run"),
    ("{r}/ok.jsonl --out {r}/new/o --max-seq-len 1", 2, "--max-seq-len: must be >= 2, not 1"),
    (
        "{r}/ok.jsonl --out {r}/new/o --save-every 10x",
        1,
        "give a number of steps (50) or of minutes (10m)",
    ),
    ("{r}/ok.jsonl --out {r}/new/o --fsdp", 1, "launch with torchrun"),
    ("{r}/ok.jsonl --out {r}/new/o --dtype float16", 2, "--dtype: invalid choice"),
    ("{r}/ok.jsonl --out {r}/held", 1, "{r}/held is in use by another run (pid "),
    ("{r}/ok.jsonl --out {r}/new/o --grad-accum 0", 2, "--grad-accum: must be >= 1"),
]


@pytest.mark.parametrize("args, code, message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input(tiny, args, code, message, capsys, monkeypatch, tmp_path):
    d, vectors, root = tiny
    monkeypatch.chdir(tmp_path)  # anything written to the default places would land here
    before = tree(root)
    full = argv(tiny, *args.format(r=root).split())
    err = run_bad(train.main, full, code, capsys)
    assert message.format(r=root) in err[-1], err
    assert err[-1].startswith("error: " if code == 1 else "train.py: error: ")
    # progress lines may come before it: the error is one line
    assert sum("error:" in line for line in err) == 1
    assert list(tmp_path.iterdir()) == []
    # nothing written, changed, or left behind (an empty folder included)
    assert tree(root) == before


def test_a_failure_before_the_first_write_leaves_no_folder(tiny, tmp_path, capsys, monkeypatch):
    """Out of memory in the first validation pass: after --out was made, before anything was written
    in it."""

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(train, "validation_loss", oom)
    assert train.main(argv(tiny, tiny[2] / "ok.jsonl", "--out", tmp_path / "a" / "b" / "out")) == 1
    assert "out of memory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_max_seq_len_is_capped_at_the_model_context(tiny, tmp_path, capsys):
    d, _, root = tiny
    short = tmp_path / "short-context"
    shutil.copytree(d, short)
    config = json.loads((short / "config.json").read_text()) | {"max_position_embeddings": 64}
    (short / "config.json").write_text(json.dumps(config))
    long = [
        conversation("the capital of France " * 20, f"Paris, {i} times.") for i in range(4)
    ]  # > 64 tokens
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    out = tmp_path / "out"
    assert (
        train.main(
            argv(
                tiny,
                tmp_path / "long.jsonl",
                "--out",
                out,
                "--max-seq-len",
                100000,
                "--model",
                short,
            )
        )
        == 0
    )
    said = [line for line in capsys.readouterr().err.splitlines() if "100000" in line]
    assert (
        len(said) == 1
        and "past the model's context (64 tokens" in said[0]
        and "at most 64" in said[0]
    )
    record = json.loads((out / "train.json").read_text())
    assert record["settings"]["max_seq_len"] == 64 and record["data"]["truncated_left"] == 4


# ------------------------------------------------------------------------------------------ kill -9
@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished run: 2 steps, a checkpoint after the first."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert train.main(argv(tiny, tiny[2] / "ok.jsonl", "--out", out)) == 0
    return out


def test_a_rerun_removes_what_a_killed_run_left_in_a_finished_run(tiny, finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = tree(out)
    # the weights, never renamed into place
    (out / ".model.safetensors.k3j2h1.tmp").write_bytes(b"\0" * 4096)
    (out / ".train.json.a8d7f6.tmp").write_bytes(b"")  # a 0-byte temporary
    (out / ".checkpoint-000002.tmp").mkdir()  # a checkpoint being written
    (out / ".checkpoint-000002.tmp" / "config.json").write_text("{}")
    # being removed
    shutil.copytree(out, out / ".checkpoint-000001.trash", ignore=shutil.ignore_patterns(".*"))
    # not yet removed
    shutil.copytree(out, out / "checkpoint-000001", ignore=shutil.ignore_patterns(".*"))
    assert train.main(argv(tiny, tiny[2] / "ok.jsonl", "--out", out)) == 0
    assert "already holds this finished run" in capsys.readouterr().err
    assert tree(out) == before  # the leftovers gone, the model untouched


KILLER = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}]
import train
from support import training
save_file = training.save_file
def save_then_die(tensors, filename, metadata=None):
    if {point!r} == "library temporary" and "checkpoint" not in str(filename):
        Path(filename).with_name(".tmpAjgqNV").write_bytes(b"half")  # safetensors 0.8's own
        os.kill(os.getpid(), signal.SIGKILL)  # in the final save, before the library's rename
    save_file(tensors, filename, metadata=metadata)
training.save_file = save_then_die
replace = os.replace
def replace_then_die(src, dst):
    if {point!r} == "final weights" and str(dst) == {weights!r}:
        # the trained weights written to their temporary, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
    if {point!r} == "last removal" and str(dst).endswith(".trash"):
        # the run done, its checkpoint renamed away but not yet removed
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
sys.exit(train.main({argv!r}))
"""


@pytest.mark.parametrize("point", ["final weights", "last removal", "library temporary"])
def test_kill_9_during_the_final_save_leaves_nothing_after_a_rerun(tiny, finished, tmp_path, point):
    out = tmp_path / "out"
    args = argv(tiny, tiny[2] / "ok.jsonl", "--out", out)
    script = KILLER.format(
        root=str(ROOT), point=point, weights=str(out / "model.safetensors"), argv=args
    )
    # as in this process: the same numbers
    p = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == -9, p.stderr
    assert [q for q in out.iterdir() if q.name.startswith(".")]  # the kill left something
    assert train.main(args) == 0
    # nothing left over, and the same model as a run never killed
    assert tree(out) == tree(finished)


# ------------------------------------------------------------------------------ two runs, one --out
WAITER = """
import sys, time
sys.path[:0] = [{root!r}]
import train
def fit(*args, **kw):
    print("training", flush=True)
    time.sleep(600)
train.fit = fit
sys.exit(train.main({argv!r}))
"""


def test_a_second_run_on_the_same_out_stops_and_a_killed_one_blocks_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    args = argv(tiny, tiny[2] / "ok.jsonl", "--out", out)
    script, env = WAITER.format(root=str(ROOT), argv=args), os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline() == "training\n"
        before = tree(tmp_path)
        err = run_bad(train.main, args, 1, capsys)
        holder = f"pid {first.pid}: -c"  # the command line of that run, here a script
        why = f"{out} is in use by another run ({holder})"
        assert err == [f"error: {why}: wait until it ends, or choose another --out"]
        assert tree(tmp_path) == before
    finally:
        first.kill()  # -9: its lock file stays
        first.wait()
    assert (out / ".lock").exists()
    assert train.main(args) == 0  # the dead run's lock blocks nothing
    assert not (out / ".lock").exists() and (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------- divergence
def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    """--lr 100 on the tiny model: step 2's loss is ~2e5 (35 at step 1), finite; the run used to end
    with exit 0 and save those weights (validation loss 31 -> 9e4)."""
    out = tmp_path / "out"
    args = argv(tiny, tiny[2] / "ok.jsonl", "--out", out, "--lr", 100, "--warmup-steps", 0)
    err = run_bad(train.main, [*args, "--max-steps", "4"], 1, capsys)
    assert err[-1].startswith("error: the loss diverged at step 2 (")
    assert "checkpoint-000001) is kept" in err[-1]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000001"]
    assert not (out / "model.safetensors").exists() and not list(out.glob(".*"))


def test_a_diverging_validation_loss_stops_the_run(tiny, tmp_path, capsys, monkeypatch):
    """The validation loss more than 5 nats above its value before training (simulated: +6 after
    the start)."""
    losses = []
    real = train.validation_loss

    def validation_loss(model, batches):
        losses.append(real(model, batches) + 6 * bool(losses))
        return losses[-1]

    monkeypatch.setattr(train, "validation_loss", validation_loss)
    out = tmp_path / "out"
    args = argv(tiny, tiny[2] / "ok.jsonl", "--out", out, "--max-steps", 5)
    err = run_bad(train.main, args, 1, capsys)
    assert err[-1].startswith("error: the validation loss diverged at step 5 (")
    assert f"{losses[0]:.4g} before training" in err[-1] and "checkpoint-000004) is kept" in err[-1]
    assert not (out / "model.safetensors").exists()
