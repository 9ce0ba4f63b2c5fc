"""support/files.py: atomic writes with the usual mode, JSON errors that name the file, leftovers of
killed runs, and vector files written by other tools."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import tree

from support import UserError, files

ROOT = Path(__file__).resolve().parent.parent


def test_atomic_write_gives_the_usual_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "UMASK", 0o027)  # as if the process ran under umask 027
    files.atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x"))
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["a.txt"]


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(UserError, match=f"{path} not found"):
        files.read_json(path)
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError, match=f"{path}: invalid JSON at line 2, column 7"):
        files.read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match=f"{path}: not UTF-8 text"):
        files.read_json(path)


def test_remove_stale_temps_keeps_live_and_unrelated_files(tmp_path):
    target = tmp_path / "out"
    mine = files.temp_path(target)
    assert mine.name == f".out.{os.getpid()}.tmp"
    dead, live, other = (
        tmp_path / ".out.99999999.tmp",
        tmp_path / f".out.{os.getppid()}.tmp",
        tmp_path / ".x.1.tmp",
    )
    for p in (mine, dead, live, other):
        p.write_text("")
    assert files.remove_stale_temps(target) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, live, other))


def test_a_vector_file_with_standard_metadata_loads(tmp_path):
    path = tmp_path / "evil_response_avg_diff.safetensors"
    save_file({"vector": torch.ones(3, 4)}, path, metadata={"format": "pt", "model": '"tiny"'})
    vec, meta = files.load_vector(path)
    assert vec.shape == (3, 4) and meta == {"format": "pt", "model": "tiny"}


# --------------------------------------------------------------------- kill -9 in a library's write
KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}]
import torch
from support import files

def save_file(tensors, filename, metadata=None):  # as safetensors 0.8: its own temporary beside it
    Path(filename).with_name(".tmpAjgqNV").write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)  # killed before its rename

files.save_file = save_file
{saver}
"""
SAVERS = {
    "save_vector": "files.save_vector(Path({path!r}), torch.ones(3, 4), {{}})",
    "save_batch": "files.save_batch(Path({path!r}), [{{'key': 1}}], {{'a': torch.ones(2)}})",
}


@pytest.mark.parametrize("saver", SAVERS)
def test_a_library_temporary_left_by_kill_9_goes_with_the_next_write(tmp_path, saver):
    """safetensors 0.8 writes its own .tmpXXXXXX beside the path it is given: atomic_write gives it
    a folder of ours, so the next write of the same file removes what a kill -9 left, whichever
    library wrote it."""
    path = tmp_path / "out" / "x.safetensors"
    call = SAVERS[saver].format(path=str(path))
    script = KILLED_SAVE.format(root=str(ROOT), saver=call)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    assert list(path.parent.iterdir())  # the kill left something
    eval(call, {"files": files, "torch": torch, "Path": Path})  # the rerun writes the same file
    assert [q.name for q in path.parent.iterdir()] == ["x.safetensors"]


def test_atomic_write_temporaries_are_recognised_as_this_process_s(tmp_path):
    """What atomic_write leaves while it writes is a temporary remove_stale_temps knows:
    `.NAME.PID-XXXX.tmp`."""
    seen = []

    def write(p):
        seen.extend(os.listdir(tmp_path))
        p.write_text("x")

    files.atomic_write(tmp_path / "a.txt", write)
    assert len(seen) == 1 and seen[0].startswith(f".a.txt.{os.getpid()}-")
    assert seen[0].endswith(".tmp")
    dead = tmp_path / ".a.txt.99999999-k3j2h1.tmp"
    dead.mkdir()
    (dead / ".tmpAjgqNV").write_text("")
    files.atomic_write(tmp_path / "a.txt", lambda p: p.write_text("y"))
    assert os.listdir(tmp_path) == ["a.txt"]


# ----------------------------------------------------------------------------------------- the lock
HOLD = """
import sys, time
sys.path[:0] = [{root!r}]
from pathlib import Path
from support import files
with files.locked(Path({path!r})):
    print("held", flush=True)
    time.sleep(60)
"""


def test_locked_refuses_a_second_run_in_one_line_and_a_dead_holder_blocks_nothing(tmp_path):
    out = tmp_path / "new" / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(root=str(ROOT), path=str(out))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        before = tree(tmp_path)
        with pytest.raises(UserError) as e:
            with files.locked(out):
                pass
        assert f"{out} is in use by another run (pid {holder.pid}: -c)" in str(e.value)
        assert "\n" not in str(e.value) and "choose another --out" in str(e.value)
        assert tree(tmp_path) == before  # the refused run changed nothing
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind
        holder.wait()
    assert (out / files.LOCK).exists()
    with files.locked(out):  # the kernel released the dead holder's lock
        (out / "result").write_text("mine")
    assert os.listdir(out) == ["result"]  # the lock file goes with the run that held it


def test_locked_removes_the_folders_it_made_when_nothing_was_written(tmp_path):
    with files.locked(tmp_path / "a" / "b"):
        assert os.listdir(tmp_path / "a" / "b") == [files.LOCK]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------- every safetensors write, one mechanism
def direct_saves(source: str) -> list[int]:
    """Lines of `source` that write a safetensors file (save_file) or a torch file (torch.save)
    outside an atomic_write call: a temporary there would be the library's, or a half file under the
    real name."""
    tree_ = ast.parse(source)
    parents = {child: node for node in ast.walk(tree_) for child in ast.iter_child_nodes(node)}

    def name(call):
        f = call.func
        return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")

    def inside_atomic_write(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.Call) and name(node) == "atomic_write":
                return True
        return False

    calls = [n for n in ast.walk(tree_) if isinstance(n, ast.Call)]
    saves = [n for n in calls if name(n) == "save_file" or ast.unparse(n.func) == "torch.save"]
    return sorted(n.lineno for n in saves if not inside_atomic_write(n))


# torch.save into a checkpoint's own temporary folder, renamed into place whole
INSIDE_A_TEMPORARY_FOLDER = {("support/training.py", 'torch.save({"optimizer": optim')}


def test_every_weights_file_is_written_through_atomic_write():
    assert direct_saves("import torch\ntorch.save({}, 'x.pt')\nsave_file({}, 'y')\n") == [2, 3]
    assert direct_saves("atomic_write(p, lambda t: save_file({}, t))\n") == []
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", ".")) or "/." in rel:
            continue
        lines = path.read_text().splitlines()
        found += [(rel, lines[n - 1].strip()) for n in direct_saves(path.read_text())]
    allowed = [
        (f, line)
        for f, line in found
        for a, b in INSIDE_A_TEMPORARY_FOLDER
        if f == a and line.startswith(b)
    ]
    assert found == allowed


def test_made_dirs_removes_only_the_empty_folders_a_failed_run_made(tmp_path):
    """check_writable makes nothing; within made_dirs, a failure removes the folders the run made
    while they are empty (innermost first), and keeps one that holds a file or existed before."""
    (tmp_path / "old").mkdir()
    with pytest.raises(KeyboardInterrupt), files.made_dirs(tmp_path / "w" / "x"):
        files.check_writable(tmp_path / "old" / "a" / "b")
        assert not (tmp_path / "old" / "a").exists()  # checked, not made
        files.atomic_write(
            tmp_path / "old" / "a" / "b" / "c" / "f.txt", lambda p: p.write_text("x")
        )
        (tmp_path / "old" / "a" / "b" / "c" / "f.txt").unlink()  # made, then left empty
        files.atomic_write(tmp_path / "kept" / "g.txt", lambda p: p.write_text("y"))
        (tmp_path / "w" / "x").mkdir(parents=True)
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["g.txt", "kept", "old"]


def test_made_dirs_keeps_what_a_run_that_succeeds_made(tmp_path):
    with files.made_dirs():
        files.check_writable(tmp_path / "a" / "b")
        (tmp_path / "a" / "b").mkdir(parents=True)
    assert (tmp_path / "a" / "b").is_dir() and files._scopes == []


# ------------------------------------------------------------------ --layer sweep's result file
@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2]", "is not a sweep result"),
        (b'{"best_layer": "2"}', "best_layer '2' is not a whole number"),
        (b'{"best_layer": true}', "best_layer True is not a whole number"),
        (b'{"best_layer": 2.0}', "best_layer 2.0 is not a whole number"),
        (b'{"best_layer": null}', "chose no layer"),
        (
            b'{"best_layer": 2, "vector_sha256": "00"}',
            "was swept on another evil_response_avg_diff",
        ),
        (b'{"best_layer": \xff}', "not UTF-8"),
    ],
)
def test_a_bad_sweep_result_is_one_line(tmp_path, content, message):
    vector = files.save_vector(
        tmp_path / "evil_response_avg_diff.safetensors", torch.ones(4, 8), {"trait": "evil"}
    )
    sweep = files.sweep_path(vector, {"trait": "evil"})
    sweep.write_bytes(content)
    with pytest.raises(UserError, match=message):
        files.sweep_layer(vector, {"trait": "evil"})


def test_a_sweep_result_of_this_vector_gives_its_layer(tmp_path):
    import hashlib

    vector = files.save_vector(
        tmp_path / "evil_response_avg_diff.safetensors", torch.ones(4, 8), {"trait": "evil"}
    )
    sha = hashlib.sha256(vector.read_bytes()).hexdigest()
    files.sweep_path(vector, {"trait": "evil"}).write_text(
        f'{{"best_layer": 2, "vector_sha256": "{sha}"}}'
    )
    assert files.sweep_layer(vector, {"trait": "evil"}) == 2
