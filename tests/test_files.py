"""support/files.py: atomic writes with the usual mode, JSON errors that name the file, leftovers of killed runs,
and vector files written by other tools."""
import os

import pytest
import torch
from safetensors.torch import save_file

from support import UserError
from support import files


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
    dead, live, other = tmp_path / ".out.99999999.tmp", tmp_path / f".out.{os.getppid()}.tmp", tmp_path / ".x.1.tmp"
    for p in (mine, dead, live, other):
        p.write_text("")
    assert files.remove_stale_temps(target) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, live, other))


def test_a_vector_file_with_standard_metadata_loads(tmp_path):
    path = tmp_path / "evil_response_avg_diff.safetensors"
    save_file({"vector": torch.ones(3, 4)}, path, metadata={"format": "pt", "model": '"tiny"'})
    vec, meta = files.load_vector(path)
    assert vec.shape == (3, 4) and meta == {"format": "pt", "model": "tiny"}


def test_made_dirs_removes_only_the_empty_folders_a_failed_run_made(tmp_path):
    """check_writable makes nothing; within made_dirs, a failure removes the folders the run made
    while they are empty (innermost first), and keeps one that holds a file or existed before."""
    (tmp_path / "old").mkdir()
    with pytest.raises(KeyboardInterrupt), files.made_dirs(tmp_path / "w" / "x"):
        files.check_writable(tmp_path / "old" / "a" / "b")
        assert not (tmp_path / "old" / "a").exists()  # checked, not made
        files.atomic_write(tmp_path / "old" / "a" / "b" / "c" / "f.txt", lambda p: p.write_text("x"))
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
