"""Bad input on the command line, as a new user would type it: each case ends in a one-line error
that names the fix (or argparse's usage line and its error), a non-zero exit, no traceback, and no
file written or changed."""

import ast
import importlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import run_bad, tiny_model_with_vectors, tree, write_vector

import model as M
import persona_vectors as pv
from apps import __main__ as apps_cli
from apps import chat, monitor

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("cli"))
    root = d.parent
    write_vector(root / "wide.safetensors", torch.randn(4, 96))  # another hidden size
    write_vector(root / "deep.safetensors", torch.randn(9, 64))  # another number of layers
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    save_file(
        {"vector": torch.randn(4, 64)}, root / "hf_meta.safetensors", metadata={"format": "pt"}
    )
    conv = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    }
    (root / "ok.jsonl").write_text(json.dumps(conv) + "\n")
    return d, vectors, root


def no_generation(*args, **kwargs):
    raise AssertionError("generation started before the input was checked")


# (arguments, exit code, what the message must say); {d} = tiny model, {v} = its vectors, {r} = the
# test folder
CASES = [
    # numbers out of range: argparse refuses them, naming the flag (exit 2)
    ("eval evil --model {d} --vectors {v} --questions -1", 2, "--questions: must be >= 1"),
    ("extract evil --model {d} --batch-size -1", 2, "--batch-size: must be >= 1"),
    ("extract evil --model {d} --max-new-tokens -4", 2, "--max-new-tokens: must be >= 1"),
    ("extract evil --model {d} --max-new-tokens 0", 2, "--max-new-tokens: must be >= 1"),
    ("generate Hi --model {d} --max-new-tokens 0", 2, "--max-new-tokens: must be >= 1"),
    ("generate Hi --model {d} --temperature -1", 2, "--temperature: must be >= 0"),
    ("generate Hi --model {d} --top-p 0", 2, "--top-p: must be > 0"),
    ("generate Hi --model {d} --top-p 1.5", 2, "--top-p: must be <= 1"),
    ("extract evil --model {d} --pos-threshold 150", 2, "--pos-threshold: must be <= 100"),
    ("sweep evil --model {d} --vectors {v} --layers 1,x", 2, "--layers"),
    ("sweep evil --model {d} --vectors {v} --layers 3-1", 2, "runs backwards: write 1-3"),
    ("sweep evil --model {d} --vectors {v} --layers 0-2", 2, "--layers: must be >= 1, not 0"),
    ("sweep evil --model {d} --vectors {v} --layers 2-9", 1, "--layer 4 out of range"),
    ("chat --model {d} --vectors {v} --layer -1", 2, "--layer: must be >= 1"),
    ("generate Hi --model {d} --dtype float64", 2, "--dtype: choose from float32"),
    # layers outside the model, caught before any generation (exit 1)
    (
        "eval evil --model {d} --vectors {v} --layer 999",
        1,
        "--layer 999 out of range: this model has blocks 1..3",
    ),
    (
        "monitor-experiment evil --model {d} --vectors {v} --layer 999",
        1,
        "--layer 999 out of range",
    ),
    ("monitor {r}/ok.jsonl --model {d} --vectors {v} --layer 999", 1, "--layer 999 out of range"),
    ("chat --model {d} --vectors {v} --layer 999", 1, "--layer 999 out of range"),
    ("sweep evil --model {d} --vectors {v} --layers 2,9", 1, "--layer 9 out of range"),
    # steering
    (
        "generate Hi --model {d} --vectors {v} --steer evil:1e30",
        1,
        "overflows; use a coefficient of at most",
    ),
    ("generate Hi --model {d} --vectors {v} --steer nosuch:1", 1, "run `extract nosuch` first"),
    (
        "generate Hi --model {d} --steer {r}/wide.safetensors:1",
        1,
        "use a vector extracted from this model",
    ),
    (
        "generate Hi --model {d} --steer {r}/deep.safetensors:1",
        1,
        "use a vector extracted from this model",
    ),
    ("generate Hi --model {d} --steer {r}/corrupt.safetensors:1", 1, "not safetensors"),
    (
        "generate Hi --model {d} --steer {r}/hf_meta.safetensors:0.1r",
        1,
        "relative coefficient has no unit",
    ),
    ("generate Hi --model {d} --steer evil", 1, "expected TRAIT:COEF"),
    ("generate Hi --model {d} --vectors {v} --steer evil:1 --layer sweep", 1, "no sweep result"),
    ("monitor {r}/ok.jsonl --model {d} --vectors {v} --layer sweep", 1, "run `sweep evil` first"),
    # gauges and vectors that do not fit
    ("chat --model {d} --gauge {r}/wide.safetensors", 1, "use a vector extracted from this model"),
    ("chat --model {d} --gauge {r}/deep.safetensors", 1, "use a vector extracted from this model"),
    (
        "monitor {r}/ok.jsonl --model {d} --trait nosuch --vectors {v}",
        1,
        "run `extract nosuch` first",
    ),
    # judges that cannot work fail before the work
    ("eval evil --model {d} --vectors {v} --judge openai", 1, "OPENAI_API_KEY"),
    ("sweep evil --model {d} --vectors {v} --judge openai", 1, "OPENAI_API_KEY"),
    ("monitor-experiment evil --model {d} --vectors {v} --judge openai", 1, "OPENAI_API_KEY"),
    ("extract evil --model {d} --judge nonsense", 1, "unknown judge"),
    ("extract evil --model {d} --judge-workers 0", 2, "--judge-workers: must be >= 1"),
    ("eval evil --model {d} --vectors {v} --device cuda:7", 1, "cuda"),
    ("extract evil --model {d} --device cuda:7", 1, "cuda"),
    # files
    ("monitor {r}/ok.jsonl --model {d} --vectors {v} --out {r}", 1, "is a directory"),
    ("monitor {r}/missing.jsonl --model {d} --vectors {v}", 1, "does not exist"),
    ("import-vector {r}/missing.pt", 1, "does not exist"),
    ("generate --model {d}", 1, "no prompt"),
    ("generate --model {d} --prompts-file {r}/missing.txt", 1, "missing.txt does not exist"),
    ("extract nosuch_trait --model {d}", 1, "unknown trait"),
    ("extract ../evil --model {d}", 1, "trait names are plain words"),
    ("import-gguf {r}/missing.gguf --model {d}", 1, "no file"),
    ("export-gguf {r}/corrupt.safetensors --model {d}", 1, "not safetensors"),
]


@pytest.mark.parametrize(
    "argv, code, message", CASES, ids=[c[0].split(" {")[0] + " " + c[2][:30] for c in CASES]
)
def test_bad_input(tiny, argv, code, message, monkeypatch, capsys, tmp_path):
    d, vectors, root = tiny
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to the default places would land here
    monkeypatch.setattr(M, "generate", no_generation)
    before = tree(root)
    app = argv.split()[0] in pv.APP_COMMANDS  # python -m apps COMMAND
    args = argv.format(d=d, v=vectors, r=root).split()
    err = run_bad(apps_cli.main if app else pv.main, args, code, capsys)
    assert message in err[-1], err
    prog = "python -m apps" if app else "persona_vectors.py"
    assert err[-1].startswith("error: " if code == 1 else prog)
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert tree(root) == before  # nothing changed


def test_import_vector_never_overwrites_silently(tiny, tmp_path, capsys):
    d, vectors, root = tiny
    src = tmp_path / "evil_response_avg_diff.pt"
    torch.save(torch.randn(4, 64), src)
    before = (vectors / "evil_response_avg_diff.safetensors").read_bytes()
    assert apps_cli.main(["import-vector", str(src), "--out", str(vectors)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert (vectors / "evil_response_avg_diff.safetensors").read_bytes() == before


def test_an_application_command_says_where_it_moved(tiny, capsys):
    """`persona_vectors.py chat` (or any command of apps/) exits 2 with one line naming
    `python -m apps chat`; the core's list of them is the applications' own."""
    d, vectors, root = tiny
    for command in pv.APP_COMMANDS:
        err = run_bad(pv.main, [command, "--model", str(d)], 2, capsys)
        assert len(err) == 1 and f"python -m apps {command}" in err[0], err
    registered = apps_cli.build_parser()._subparsers._group_actions[0].choices
    assert set(pv.APP_COMMANDS) == set(registered)


def test_monitor_skips_and_counts_lines_that_do_not_fit(tiny, tmp_path, capsys):
    d, vectors, root = tiny
    good = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    }
    lines = [
        json.dumps(good),
        json.dumps(
            {"messages": [{"role": "assistant", "content": "I start."}]}
        ),  # no user turn before
        json.dumps({"messages": "not a list"}),
        json.dumps(
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}
        ),  # no content
        json.dumps(
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}
        ),
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
        ),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "word " * 5000},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        ),  # past the context
        "not json",
        json.dumps(good),
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = monitor.monitor(str(src), str(d), ["evil"], layer=2, vectors=str(vectors), device="cpu")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 9]
    err = capsys.readouterr().err
    for reason in (
        "no assistant turn after a user turn; line 2",
        "no `messages` list; line 3",
        "a message without a known role or a text content; lines 4, 5",
        "an empty reply; line 6",
        "longer than the model's context",
        "not JSON; line 8",
    ):
        assert reason in err, reason


def test_chat_survives_a_failed_save(tiny, tmp_path):
    import io

    d, vectors, root = tiny
    blocker = tmp_path / "file"
    blocker.write_text("x")
    stdout = io.StringIO()
    messages = chat.chat(
        str(d),
        vectors=str(vectors),
        max_new_tokens=3,
        device="cpu",
        stdout=stdout,
        stdin=io.StringIO(f"Hi\n/save {blocker}/sub/c.jsonl\nBye\n"),
    )
    # the chat went on after the failed /save
    assert "error:" in stdout.getvalue() and len(messages) == 4


def test_every_flag_is_named_as_the_parameter_it_feeds():
    """A command's flags are its function's parameters, by the same names: no `dest=` renames, and
    every flag (and no more) reaches a parameter of the function the command runs, or of the
    function its **options go on to (open_run and budget_for for the judged pipelines,
    load_checked for shift, generate for generate's command line)."""
    onward = [pv.open_run, pv.load_checked, pv.budget_for, pv.generate]
    passed_on = {p for f in onward for p in inspect.signature(f).parameters}
    commands = pv.build_parser()._subparsers._group_actions[0].choices
    for name, c in commands.items():
        run = c.get_default("run")
        params = inspect.signature(run).parameters
        takes_more = any(p.kind == p.VAR_KEYWORD for p in params.values())
        dests = set()
        for a in c._actions:
            if a.dest == "help":
                continue
            if a.option_strings:
                assert a.dest == a.option_strings[0].lstrip("-").replace("-", "_"), (name, a.dest)
            assert a.dest in params or (takes_more and a.dest in passed_on), (name, a.dest)
            dests.add(a.dest)
        required = [
            p for p, v in params.items() if v.default is v.empty and v.kind != v.VAR_KEYWORD
        ]
        assert set(required) <= dests, (name, required)


def test_the_applications_pass_each_flag_to_the_parameter_of_its_name():
    """apps/: each command's `run=lambda a: f(...)` hands every flag `a.x`, by keyword or by
    position, to the parameter `x` of f: `--model` feeds `model`, as in persona_vectors.py and
    train.py (not `model_name=a.model`)."""
    renamed, seen = [], 0
    for path in sorted((ROOT / "apps").glob("*.py")):
        module = importlib.import_module(f"apps.{path.stem}")
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.keyword) and node.arg == "run"):
                continue
            a, call = node.value.args.args[0].arg, node.value.body  # run=lambda a: f(...)
            params = list(inspect.signature(getattr(module, call.func.id)).parameters)
            pairs = list(zip(params, call.args))
            for name, v in pairs + [(kw.arg, kw.value) for kw in call.keywords]:
                if isinstance(v, ast.Attribute) and getattr(v.value, "id", None) == a:
                    seen += 1
                    if name != v.attr:
                        renamed.append(f"{path.name}: {call.func.id}({name}=a.{v.attr})")
    assert seen > 50 and renamed == []


def test_layers_takes_lists_and_ranges():
    """sweep --layers: blocks and A-B ranges, each block once, in the order given."""
    parse = pv.build_parser().parse_args
    for text, expect in (("8", [8]), ("8,12,16", [8, 12, 16]), ("16-19", [16, 17, 18, 19])):
        assert parse(["sweep", "evil", "--layers", text]).layers == expect
    assert parse(["sweep", "evil", "--layers", "20,14-16,15"]).layers == [20, 14, 15, 16]
