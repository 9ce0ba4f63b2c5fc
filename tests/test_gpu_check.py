"""tools/gpu_check.py, the check a lent GPU runs, on the CPU with tiny shapes (--device cpu --tiny):
every section's code runs, so the script has not rotted by the time a GPU is lent; and one failing
or slow check does not stop the others."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {
    "parity": [
        f"{m}.{d}"
        for m in ("llama3", "qwen2", "qwen2-tied", "qwen3", "gemma2", "gemma3")
        for d in ("float32", "bfloat16")
    ]
    + [f"{m}.batched-generation" for m in ("qwen3", "gemma2", "gemma3")],
    "pipelines": ["extract", "generate-steered", "monitor", "flag", "train-2-steps", "serve"],
    "speed": [
        "build-7b-shape",
        "decode-batch1",
        "decode-batch64",
        "capture-batch64",
        "train-step-1b-shape",
    ],
}

pytest.importorskip("transformers")  # the reference the parity and speed sections compare against


def figures(check: dict) -> dict:
    return {
        k: v for k, v in check.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def test_every_section_runs_on_the_cpu_with_finite_figures(tmp_path):
    out = tmp_path / "record.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu_check.py"),
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == list(CHECKS)
    for section, names in CHECKS.items():
        for name in names:
            check = sections[section][name]
            assert check["status"] == "ok", (section, name, check)
            assert figures(check) and all(math.isfinite(v) for v in figures(check).values()), (
                section,
                name,
                check,
            )
    assert sections["parity"]["default-model"]["status"] == "skip"  # no --default-model given
    assert sections["speed"]["decode-batch1"]["roofline_share"] > 0
    assert sections["pipelines"]["train-2-steps"]["weights_moved"] > 0
    lines = [x for x in proc.stdout.splitlines() if x.split(" ")[0] in ("ok", "FAIL", "SKIP")]
    # one line per check, and the skipped default model
    assert len(lines) == sum(map(len, CHECKS.values())) + 1


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_check

    return gpu_check


def test_a_failing_check_is_one_line_and_the_others_go_on(gpu_check, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(gpu_check.pv, "extract", broken)
    out = tmp_path / "record.json"
    assert (
        gpu_check.main(["--device", "cpu", "--tiny", "--only", "pipelines", "--out", str(out)]) == 1
    )
    printed = capsys.readouterr().out
    assert (
        "FAIL pipelines.extract: RuntimeError: CUDA "
        "error: an illegal memory access was encountered\n" in printed
    )
    checks = json.loads(out.read_text())["sections"]["pipelines"]
    assert (
        checks["extract"]["status"] == "fail"
        and "illegal memory access" in checks["extract"]["traceback"]
    )
    assert all(checks[name]["status"] == "ok" for name in CHECKS["pipelines"][1:])


def test_a_check_over_its_section_budget_fails_and_the_rest_of_the_section_is_skipped(
    gpu_check, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(gpu_check.pv, "extract", lambda *a, **k: time.sleep(60))
    monkeypatch.setitem(gpu_check.BUDGET_S, "pipelines", 2)
    out = tmp_path / "record.json"
    assert (
        gpu_check.main(["--device", "cpu", "--tiny", "--only", "pipelines", "--out", str(out)]) == 1
    )
    assert "FAIL pipelines.extract: OverBudget" in capsys.readouterr().out
    checks = json.loads(out.read_text())["sections"]["pipelines"]
    assert [checks[name]["status"] for name in CHECKS["pipelines"]] == ["fail"] + ["skip"] * 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda"], "no CUDA device here"),
        (
            ["--device", "cpu", "--default-model", "nowhere"],
            "--default-model nowhere: no config.json there",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(gpu_check, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(args + ["--out", str(tmp_path / "out" / "record.json")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written
