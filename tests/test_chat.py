"""`chat` driven by a script of inputs, as from a pipe."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_model_with_vectors

import model as M
import persona_vectors as pv
from apps import chat
from apps.monitor import Gauge
from support import checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_with_vectors(tmp_path_factory.mktemp("tiny"))


def test_scripted_chat_writes_jsonl_and_gauges(tiny, tmp_path):
    d, vectors = tiny
    script = (
        "Hello there!\n/steer evil:3\nWhat is 2 + 2?\n/steer nonsense\n/gauge\n/unsteer\n/quit\n"
        "never read\n"
    )
    out = io.StringIO()
    save = tmp_path / "conv.jsonl"
    messages = chat.chat(
        str(d),
        vectors=str(vectors),
        max_new_tokens=6,
        save=str(save),
        device="cpu",
        stdin=io.StringIO(script),
        stdout=out,
    )
    text = out.getvalue()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "Hello there!",
        "What is 2 + 2?",
    ]
    assert json.loads(save.read_text()) == {"messages": messages}
    # a gauge per trait per turn
    assert text.count("[evil L1]") == 2 and text.count("[humorous L1]") == 2
    assert (
        "steering: evil:3" in text
        and "error: --steer 'nonsense'" in text
        and "steering: off" in text
    )
    history = [line for line in text.splitlines() if line.startswith("turn ")]
    assert len(history) == 4 and "(steering evil:3)" in history[2] and "(steering" not in history[0]


def test_gauge_readings_are_the_projections(tiny):
    d, vectors = tiny
    model, tok = checkpoint.load(str(d), "cpu", torch.float32)
    g = Gauge.from_file(
        vectors / "evil_response_avg_diff.safetensors", 2, model.config.num_hidden_layers
    )
    messages = [{"role": "user", "content": "Hello there!"}]
    cap = M.Capture()
    out = M.generate(
        model, [tok.encode_chat(messages)], 6, stop_ids=tok.stop_ids, pad_id=tok.pad_id, capture=cap
    )[0]
    reading = g.read({"prompt_last": cap.prompt_last(), "response_avg": cap.answer_mean()})
    ids = tok.encode_chat(messages)
    ref = M.Capture()
    with torch.no_grad():
        model(
            torch.tensor([ids + out]),
            answer_start=torch.tensor([len(ids)]),
            capture=ref,
            logits="none",
        )
    v, _ = pv.load_vector(vectors / "evil_response_avg_diff.safetensors")
    u = v[2] / v[2].norm()
    assert reading["prompt_last"] == pytest.approx(float(ref.prompt_last()[0, 2] @ u), abs=1e-4)
    assert reading["response_avg"] == pytest.approx(float(ref.answer_mean()[0, 2] @ u), abs=1e-4)
    assert g.marks == {"prompt_last": (-1.0, 1.0), "response_avg": (-2.0, 2.0)}
    # at the pos mark, at the neg mark
    line = chat.show(g, {"prompt_last": 1.0, "response_avg": -2.0})
    assert "neg -1.00 [---------|] pos +1.00" in line and "neg -2.00 [|---------] pos +2.00" in line


def test_chat_from_a_pipe(tiny, tmp_path):
    """`python -m apps chat`, as a user starts it, with its input from a pipe."""
    d, vectors = tiny
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps",
            "chat",
            "--model",
            str(d),
            "--vectors",
            str(vectors),
            "--gauge",
            "evil",
            "--max-new-tokens",
            "4",
            "--save",
            str(tmp_path / "c.jsonl"),
            "--device",
            "cpu",
        ],
        input="Hi\nBye\n",
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[evil L1]") == 2 and "humorous" not in r.stdout
    assert len(json.loads((tmp_path / "c.jsonl").read_text())["messages"]) == 4


@pytest.mark.parametrize("when", ["at the prompt", "during a reply"])
def test_ctrl_c_saves_the_finished_turns(tiny, tmp_path, monkeypatch, capsys, when):
    """Ctrl-C after a turn: the conversation so far is appended to --save (a reply cut off is left
    out), stderr says where, and the exit status is still 130."""
    from apps import __main__ as apps_cli

    d, vectors = tiny
    save = tmp_path / "new" / "c.jsonl"
    save.parent.mkdir()
    save.write_text('{"messages": []}\n')  # an earlier conversation: appended to, never lost

    class User(io.StringIO):
        def readline(self):
            line = super().readline()
            if not line and when == "at the prompt":
                raise KeyboardInterrupt
            return line

    answer = pv.answer_with_activations

    def answer_once(*args, **kwargs):
        if sum(m["role"] == "user" for m in args[2][0]) > 1:
            raise KeyboardInterrupt  # the second reply
        return answer(*args, **kwargs)

    monkeypatch.setattr(pv, "answer_with_activations", answer_once)
    monkeypatch.setattr(
        sys, "stdin", User("Hi\n" + ("Again\n" if when == "during a reply" else ""))
    )
    code = apps_cli.main(
        [
            "chat",
            "--model",
            str(d),
            "--vectors",
            str(vectors),
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
            "--save",
            str(save),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-2:] == [
        f"interrupted: the conversation is saved in {save}",
        "interrupted",
    ], err
    lines = [json.loads(x) for x in save.read_text().splitlines()]
    assert lines[0] == {"messages": []} and len(lines) == 2
    assert [(m["role"], m["content"]) for m in lines[1]["messages"]][0] == ("user", "Hi")
    assert [m["role"] for m in lines[1]["messages"]] == ["user", "assistant"]
    assert [p.name for p in save.parent.iterdir()] == ["c.jsonl"]  # no temporary left


def test_ctrl_c_before_any_turn_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    from apps import __main__ as apps_cli

    d, vectors = tiny

    class User(io.StringIO):
        def readline(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", User())
    code = apps_cli.main(
        [
            "chat",
            "--model",
            str(d),
            "--vectors",
            str(vectors),
            "--device",
            "cpu",
            "--save",
            str(tmp_path / "a" / "c.jsonl"),
        ]
    )
    assert code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []  # no file, and no folder made for it
