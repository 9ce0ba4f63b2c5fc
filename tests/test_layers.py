"""The import stack: every file imports only files of its own layer or below (read from the code
with ast, lazy imports inside functions included), with no cycle, so that each layer reads, runs and
copies without the ones above.

    model.py  <  support/  <  judge.py  <  persona_vectors.py  <  train.py  <  apps/  <  tools/

model.py imports no project file at all: the network, its generation, Capture and its loader copy
alone (test_model_py_can_be_copied_alone runs such a copy). An import by
name (importlib.import_module("x"), __import__("x")) counts as an import; one whose name is not
written out cannot be checked, so it is refused. The applications are started their own way
(python -m apps), never by the core.
"""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = [
    "model.py",
    "support/*.py",
    "judge.py",
    "persona_vectors.py",
    "train.py",
    "apps/*.py",
    "tools/*.py",
]
CORE = ["model.py", "judge.py", "persona_vectors.py", "train.py"]
DYNAMIC = ("import_module", "__import__")  # importlib.import_module(name), __import__(name)
NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # a dotted module name, e.g. "apps.chat"


def layer_of() -> dict[Path, int]:
    return {p: i for i, pattern in enumerate(STACK) for p in sorted(ROOT.glob(pattern))}


def resolve(name: str, importer: Path) -> Path | None:
    """The project file a module name refers to (None: torch, the standard library, ...)."""
    parts = name.split(".")
    for base in (ROOT, importer.parent):  # tools/ put their own folder on sys.path
        for candidate in (
            base.joinpath(*parts).with_suffix(".py"),
            base.joinpath(*parts, "__init__.py"),
        ):
            if candidate.is_file():
                return candidate
    return None


def dynamic_name(node: ast.AST) -> str | None:
    """The module name of an import by name (importlib.import_module("x"), __import__("x")): the
    string, or "?" when it is not written out; None for any other node."""
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if called not in DYNAMIC:
        return None
    arg = node.args[0] if node.args else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "?"


def imports(path: Path) -> list[tuple[int, Path]]:
    """(line, imported project file) for every import in `path`, imports by name included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif dynamic_name(node) not in (None, "?"):
            names = [dynamic_name(node)]
        else:
            continue
        for target in {t for n in names if (t := resolve(n, path)) is not None and t != path}:
            out.append((node.lineno, target))
    return out


def edges() -> list[tuple[Path, int, Path]]:
    return [(p, line, t) for p in layer_of() for line, t in imports(p)]


def test_every_import_runs_down_the_stack():
    layer = layer_of()
    rel = lambda p: p.relative_to(ROOT).as_posix()  # noqa: E731
    up = [
        f"{rel(p)}:{line} imports {rel(t)} ({STACK[layer[p]]} is below {STACK[layer.get(t, -1)]})"
        for p, line, t in edges()
        if t in layer and layer[t] > layer[p]
    ]
    assert not up, "imports that run up the stack:\n" + "\n".join(up)
    assert [rel(t) for p, _, t in edges() if rel(p) == "model.py"] == [], (
        "model.py imports a project file"
    )
    assert len(layer) > 10, "the stack's patterns found almost no files"


def test_no_import_by_an_unwritten_name():
    """importlib.import_module(variable) could import anything, unseen by the checks here."""
    found = [
        f"{p.relative_to(ROOT).as_posix()}:{n.lineno}"
        for p in layer_of()
        for n in ast.walk(ast.parse(p.read_text()))
        if dynamic_name(n) == "?"
    ]
    assert not found, f"imports by a name not written out (write `import x` instead): {found}"


def test_the_core_never_reaches_apps_or_tools():
    """The four files of the method import nothing from apps/ or tools/, by any means."""
    above = [ROOT / "apps", ROOT / "tools"]
    found = [
        f"{p.relative_to(ROOT).as_posix()}:{line} imports {t.relative_to(ROOT).as_posix()}"
        for p, line, t in edges()
        if p.relative_to(ROOT).as_posix() in CORE and any(d in t.parents for d in above)
    ]
    for f in CORE:  # a module's name in a string, for an import elsewhere: "apps.chat"
        for n in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and NAME.fullmatch(n.value):
                t = resolve(n.value, ROOT / f)
                if t is not None and any(d in t.parents for d in above):
                    named = t.relative_to(ROOT).as_posix()
                    found.append(f"{f}:{n.lineno} names {named} ({n.value!r})")
    assert not found, "the core reaches the applications or tools:\n" + "\n".join(found)
    assert all((ROOT / f).is_file() for f in CORE)


def test_the_walk_sees_imports_by_name(tmp_path):
    """The walk itself: an import by a written-out name is an edge, one by a variable is refused."""
    code = "import importlib\nimportlib.import_module('apps.chat')\n__import__('tools.bench')\n"
    code += "importlib.import_module(name)\n"
    f = tmp_path / "probe.py"
    f.write_text(code)
    got = {(line, t.relative_to(ROOT).as_posix()) for line, t in imports(f)}
    unwritten = [n.lineno for n in ast.walk(ast.parse(code)) if dynamic_name(n) == "?"]
    assert got == {(2, "apps/chat.py"), (3, "tools/bench.py")} and unwritten == [4]


def test_no_cycle():
    graph: dict[Path, set[Path]] = {}
    for p, _, t in edges():
        graph.setdefault(p, set()).add(t)
    state: dict[Path, int] = {}  # 1: on the current path, 2: done

    def visit(p, path):
        state[p] = 1
        for t in graph.get(p, ()):
            if state.get(t) == 1:
                raise AssertionError(
                    "import cycle: "
                    + " -> ".join(x.relative_to(ROOT).as_posix() for x in path + [t])
                )
            if t not in state:
                visit(t, path + [t])
        state[p] = 2

    for p in list(graph):
        if p not in state:
            visit(p, [p])


COPIED_ALONE = """
import json, sys, torch, model as M
from safetensors.torch import save_file
out = {}
for name in sys.argv[1:]:
    m = M.load_model(GOLDEN + "/" + name, "cpu", torch.float32)
    cap = M.Capture()
    answers = M.generate(m, [[5, 6, 7], [40, 41, 42, 43]], 6, capture=cap)
    out[name + ".answers"] = torch.tensor(answers)
    out[name + ".answer_mean"], out[name + ".prompt_last"] = cap.answer_mean(), cap.prompt_last()
save_file(out, "copied.safetensors")
"""


def test_model_py_can_be_copied_alone(tmp_path):
    """model.py alone in an empty folder, in a fresh Python without the project on its path, loads
    checkpoints (sharded; tied; Gemma 3), generates and captures exactly as the project does."""
    import shutil
    import subprocess

    import torch
    from safetensors.torch import load_file

    import model as M
    from support import checkpoint

    # at module level: torch, safetensors, the standard library
    tree = ast.parse((ROOT / "model.py").read_text())
    top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    top += [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "__future__"}
    assert [m for m in top if m.split(".")[0] not in allowed] == []
    shutil.copy(ROOT / "model.py", tmp_path / "model.py")
    names = ["tiny-llama3", "tiny-tied", "tiny-gemma3"]
    script = f"GOLDEN = {str(ROOT / 'tests' / 'golden')!r}\n" + COPIED_ALONE
    r = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
    )
    assert r.returncode == 0, r.stderr
    copied = load_file(tmp_path / "copied.safetensors")
    for name in names:  # the project's way: checked, and on the CPU the split matrix products
        m = checkpoint.load_model(ROOT / "tests" / "golden" / name, "cpu", torch.float32)
        cap = M.Capture()
        answers = M.generate(m, [[5, 6, 7], [40, 41, 42, 43]], 6, capture=cap)
        assert copied[name + ".answers"].tolist() == answers
        torch.testing.assert_close(
            copied[name + ".answer_mean"], cap.answer_mean(), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            copied[name + ".prompt_last"], cap.prompt_last(), rtol=1e-5, atol=1e-5
        )


def test_every_folder_opens_with_an_index():
    for folder in ("support", "apps", "tools", "docs"):
        index = ROOT / folder / ("__init__.py" if folder in ("support", "apps") else "README.md")
        assert index.is_file(), f"{folder}/ has no index ({index.name})"
        listed = index.read_text()
        for f in sorted((ROOT / folder).glob("*.py" if folder != "docs" else "*.md")):
            if f.name not in ("__init__.py", "README.md"):
                assert f.name in listed, f"{folder}/{index.name} does not list {f.name}"


def function_lengths(src: str) -> dict[str, int]:
    """Each function's length in lines, its decorators included."""
    functions = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)]
    return {
        f.name: f.end_lineno - min([f.lineno] + [d.lineno for d in f.decorator_list]) + 1
        for f in functions
    }


def test_persona_vectors_and_judge_read_as_a_tutorial():
    """Issue 25 (as formatted by ruff, which .ci/run checks): persona_vectors.py within 1,200 lines,
    its method section (the first banner to the second) within 220 and its command line (the last
    banner to the end) within 180; judge.py within 400; no line over 100 columns and no function
    over 50 lines in either, the command line's parser builder aside."""
    src = (ROOT / "persona_vectors.py").read_text(encoding="utf-8")
    lines = src.splitlines()
    banners = [i for i, line in enumerate(lines) if line.startswith("# ====")][::2]
    method, pipelines, command_line = banners
    assert len(lines) <= 1200 and max(map(len, lines)) <= 100
    assert pipelines - method <= 220 and len(lines) - command_line <= 180
    lengths = function_lengths(src)
    del lengths["build_parser"]
    assert max(lengths.values()) <= 50, lengths
    src = (ROOT / "judge.py").read_text(encoding="utf-8")
    assert len(src.splitlines()) <= 400 and max(map(len, src.splitlines())) <= 100
    assert max(function_lengths(src).values()) <= 50
