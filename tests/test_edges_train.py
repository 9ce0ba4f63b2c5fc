"""train.py at its edges: bad input as one line that changes no file and leaves no folder behind, the sequence
length capped at the model's context, and what a run killed with -9 leaves cleaned by the next run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from tiny import run_bad, tiny_model_with_vectors, tree, write_vector

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def conversation(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny model, its vectors, the test folder): data files, a vector of another width, an empty folder, a folder
    that is not a run."""
    root = tmp_path_factory.mktemp("edges")
    d, vectors = tiny_model_with_vectors(root)
    rows = [conversation(f"What is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(11)]  # 1 to validate on
    (root / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bad.jsonl").write_text("{oops\n")
    write_vector(root / "wide.safetensors", torch.randn(4, 96))
    (root / "empty").mkdir()
    (root / "notrun").mkdir()
    (root / "notrun" / "notes.txt").write_text("mine")
    return d, vectors, root


def argv(tiny, *args) -> list[str]:
    """A short run's flags, then `args` (DATA --out OUT and any flag, which overrides these)."""
    d, vectors, _ = tiny
    return ["--model", str(d), "--vectors", str(vectors), "--device", "cpu", "--batch-size", "2", "--grad-accum", "1",
            "--max-steps", "2", "--save-every", "1", *map(str, args)]




# (arguments after DATA --out OUT, exit code, what the message must say); {r} = the test folder. A new --out is
# always below a folder that does not exist yet: a failed run must leave neither behind.
CASES = [
    ("{r}/bad.jsonl --out {r}/new/o", 1, "bad.jsonl:1: not JSON"),
    ("{r}/missing.jsonl --out {r}/new/o", 1, "missing.jsonl does not exist"),
    ("{r}/ok.jsonl --out {r}/new/o --steer nosuch:1", 1, "run `extract nosuch` first"),
    ("{r}/ok.jsonl --out {r}/new/o --steer evil", 1, "expected TRAIT:COEF"),
    ("{r}/ok.jsonl --out {r}/new/o --steer {r}/wide.safetensors:1", 1, "use a vector extracted from this model"),
    ("{r}/ok.jsonl --out {r}/new/o --ablate {r}/wide.safetensors", 1, "use a vector extracted from this model"),
    ("{r}/ok.jsonl --out {r}/new/deeper/o --resume", 1, "holds no training run"),
    ("{r}/ok.jsonl --out {r}/empty --resume", 1, "holds no training run"),  # a folder that was there stays
    ("{r}/ok.jsonl --out {r}/notrun", 1, "not empty and holds no training run"),
    ("{r}/ok.jsonl --out {r}/ok.jsonl", 1, "is an input of this run"),
    ("{r}/ok.jsonl --out {r}/new/o --max-seq-len 1", 1, "--max-seq-len 1 must be at least 2"),
    ("{r}/ok.jsonl --out {r}/new/o --save-every 10x", 1, "give a number of steps (50) or of minutes (10m)"),
    ("{r}/ok.jsonl --out {r}/new/o --fsdp", 1, "launch with torchrun"),
    ("{r}/ok.jsonl --out {r}/new/o --dtype float16", 2, "--dtype: invalid choice"),
]


@pytest.mark.parametrize("args, code, message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input(tiny, args, code, message, capsys, monkeypatch, tmp_path):
    d, vectors, root = tiny
    monkeypatch.chdir(tmp_path)  # anything written to the default places would land here
    before = tree(root)
    full = argv(tiny, *args.format(r=root).split())
    err = run_bad(train.main, full, code, capsys)
    assert message in err[-1], err
    assert err[-1].startswith("error: " if code == 1 else "train.py: error: ")
    assert sum("error:" in line for line in err) == 1  # progress lines may come before it: the error is one line
    assert list(tmp_path.iterdir()) == []
    assert tree(root) == before  # nothing written, changed, or left behind (an empty folder included)


def test_a_failure_before_the_first_write_leaves_no_folder(tiny, tmp_path, capsys, monkeypatch):
    """Out of memory in the first validation pass: after --out was made, before anything was written in it."""
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
    long = [conversation("the capital of France " * 20, f"Paris, {i} times.") for i in range(4)]  # > 64 tokens
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    out = tmp_path / "out"
    assert train.main(argv(tiny, tmp_path / "long.jsonl", "--out", out, "--max-seq-len", 100000, "--model", short)) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "100000" in line]
    assert len(said) == 1 and "past the model's context (64 tokens" in said[0] and "at most 64" in said[0]
    record = json.loads((out / "train.json").read_text())
    assert record["settings"]["max_seq_len"] == 64 and record["data"]["truncated_left"] == 4


# ------------------------------------------------------------------------------------------------------ kill -9
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
    (out / ".model.safetensors.k3j2h1.tmp").write_bytes(b"\0" * 4096)  # the weights, never renamed into place
    (out / ".train.json.a8d7f6.tmp").write_bytes(b"")  # a 0-byte temporary
    (out / ".checkpoint-000002.tmp").mkdir()  # a checkpoint being written
    (out / ".checkpoint-000002.tmp" / "config.json").write_text("{}")
    shutil.copytree(out, out / ".checkpoint-000001.trash", ignore=shutil.ignore_patterns(".*"))  # being removed
    shutil.copytree(out, out / "checkpoint-000001", ignore=shutil.ignore_patterns(".*"))  # not yet removed
    assert train.main(argv(tiny, tiny[2] / "ok.jsonl", "--out", out)) == 0
    assert "already holds this finished run" in capsys.readouterr().err
    assert tree(out) == before  # the leftovers gone, the model untouched


KILLER = """
import os, signal, sys
sys.path[:0] = [{root!r}]
import train
replace = os.replace
def replace_then_die(src, dst):
    if {point!r} == "final weights" and str(dst) == {weights!r}:
        os.kill(os.getpid(), signal.SIGKILL)  # the trained weights written to their temporary, not yet renamed
    replace(src, dst)
    if {point!r} == "last removal" and str(dst).endswith(".trash"):
        os.kill(os.getpid(), signal.SIGKILL)  # the run done, its checkpoint renamed away but not yet removed
os.replace = replace_then_die
sys.exit(train.main({argv!r}))
"""


@pytest.mark.parametrize("point", ["final weights", "last removal"])
def test_kill_9_during_the_final_save_leaves_nothing_after_a_rerun(tiny, finished, tmp_path, point):
    out = tmp_path / "out"
    args = argv(tiny, tiny[2] / "ok.jsonl", "--out", out)
    script = KILLER.format(root=str(ROOT), point=point, weights=str(out / "model.safetensors"), argv=args)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})  # as in this process: the same numbers
    assert p.returncode == -9, p.stderr
    assert [q for q in out.iterdir() if q.name.startswith(".")]  # the kill left something
    assert train.main(args) == 0
    assert tree(out) == tree(finished)  # nothing left over, and the same model as a run never killed
