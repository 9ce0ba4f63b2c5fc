"""train.py: the data (trained tokens, truncation, bad files), the training step against
transformers with hooks and torch's AdamW, interventions, exact resume after an interrupt and after
kill -9, DDP and FSDP2 on 2 CPU processes against one, the output directory, and bad input.
Everything on a tiny random chat model."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tokenizer import make_model_dir
from tiny import tiny_model_with_vectors, write_vector

import train
from support import UserError, checkpoint, training
from support.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the capital of France is Paris a helpful assistant answers kindly numbers 1 2 3 evil harm help"
).split()


def conversation(i: int) -> dict:
    g = torch.Generator().manual_seed(i)

    def say(n):
        return " ".join(WORDS[j] for j in torch.randint(len(WORDS), (n,), generator=g).tolist())

    messages = [
        {"role": "user", "content": say(3 + i % 7)},
        {"role": "assistant", "content": say(4 + i % 11)},
    ]
    if i % 5 == 0:  # a few with a system prompt and a second exchange
        messages = (
            [{"role": "system", "content": say(3)}]
            + messages
            + [{"role": "user", "content": say(4)}, {"role": "assistant", "content": say(5)}]
        )
    return {"messages": messages}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, vectors dir, 12-conversation data file, 4-conversation data file)."""
    root = tmp_path_factory.mktemp("train")
    model_dir, vectors = tiny_model_with_vectors(root)
    data = write_jsonl(root / "data.jsonl", [conversation(i) for i in range(12)])
    small = write_jsonl(root / "small.jsonl", [conversation(i) for i in range(4)])
    return model_dir, vectors, data, small


def run(tiny, out, **kw) -> Path:
    model_dir, vectors, data, _ = tiny
    args = (
        dict(
            model=str(model_dir),
            out=str(out),
            vectors=str(vectors),
            batch_size=2,
            grad_accum=1,
            lr=1e-3,
            warmup_steps=2,
            device="cpu",
        )
        | kw
    )
    return train.train(str(kw.pop("data", data)), **{k: v for k, v in args.items() if k != "data"})


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


# ----------------------------------------------------------------------------------------- the data
@pytest.mark.parametrize(
    "name, eot", [("qwen2.5-7b-instruct", "<|im_end|>"), ("llama-3.1-8b-instruct", "<|eot_id|>")]
)
def test_trained_tokens_are_the_replies_and_their_end_of_turn(tmp_path, name, eot):
    tok = Tokenizer(make_model_dir(tmp_path / name, name))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "Line two?"},
        {"role": "assistant", "content": "Line four."},
    ]
    ex = train.encode_conversation(tok, messages)
    # the template, unchanged
    assert ex.ids.tolist() == tok.encode_chat(messages, add_generation_prompt=False)
    trained = tok.decode(ex.ids[ex.trained], skip_special_tokens=False)
    assert trained == f"Paris is the capital.{eot}Line four.{eot}"
    # each trained run starts right after the assistant header: the header itself is not trained
    header = tok.encode(
        "<|im_start|>assistant\n"
        if eot == "<|im_end|>"
        else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    starts = [i for i in range(1, len(ex.ids)) if ex.trained[i] and not ex.trained[i - 1]]
    assert len(starts) == 2 and all(ex.ids[s - len(header) : s].tolist() == header for s in starts)


def test_truncation_from_the_left_keeps_the_last_reply_whole():
    ex = train.Example(
        torch.arange(10), torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    )
    assert train.truncate_left(ex, 10) is ex
    # 6 tokens cut: the first reply goes, one prompt token stays before the last
    short = train.truncate_left(ex, 4)
    assert short.ids.tolist() == [6, 7, 8, 9] and short.trained.tolist() == [
        False,
        True,
        True,
        True,
    ]
    assert train.truncate_left(ex, 3) is None  # the last reply alone: nothing to condition it on


def test_data_counts_skipped_truncated_and_dropped(tiny, tmp_path):
    model_dir, _, _, _ = tiny
    tok = Tokenizer(model_dir)
    rows = [
        conversation(1),
        {"messages": [{"role": "user", "content": "no reply"}]},
        {
            "messages": [
                {"role": "user", "content": "a " * 200},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "b " * 200},
            ]
        },
    ]
    first = len(train.encode_conversation(tok, rows[0]["messages"]).ids)  # fits exactly
    examples, counts = train.load_examples(
        write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=first
    )
    assert counts == {
        "conversations": 4,
        "no_assistant_reply": 1,
        "truncated_left": 1,
        "reply_longer_than_max_seq_len": 1,
    }
    assert [len(e.ids) for e in examples] == [first, first]
    assert (
        tok.decode(examples[1].ids[examples[1].trained], skip_special_tokens=False)
        == "ok<|im_end|>"
    )


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "holds no conversations"),
        ("\n  \n", "holds no conversations"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": '
            '"b"}]}\n{"messages": [',
            r"d\.jsonl:2: not JSON",
        ),
        ('{"text": "hello"}\n', r"d\.jsonl:1: expected \{\"messages\""),
        (
            '{"messages": [{"role": "robot", "content": "a"}]}\n',
            r"d\.jsonl:1: unknown message role 'robot'",
        ),
        (
            '{"messages": [{"role": "user", "content": "only a question"}]}\n',
            "no conversation to train on",
        ),
    ],
)
def test_bad_data_files(tiny, tmp_path, text, match):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(UserError, match=match):
        train.load_examples(tmp_path / "d.jsonl", Tokenizer(tiny[0]), 2048)


def test_schedule_and_data_order():
    assert [round(train.lr_at(s, 6, 1.0, 2), 6) for s in range(6)] == [
        0.5,
        1.0,
        1.0,
        0.75,
        0.5,
        0.25,
    ]
    assert [train.lr_at(s, 3, 2.0, 0) for s in range(3)] == [2.0, 2.0 * 2 / 3, 2.0 / 3]
    exs = [train.Example(torch.tensor([i, i]), torch.tensor([False, True])) for i in range(10)]
    epoch = [
        int(e.ids[0]) for s in range(3) for e in training.step_examples(exs, s, 4, seed=0)
    ]  # 4 + 4 + 2
    assert sorted(epoch) == list(range(10))  # every conversation once per epoch
    assert epoch != [
        int(e.ids[0]) for s in range(3, 6) for e in training.step_examples(exs, s, 4, seed=0)
    ]
    # a short last step split over 2 processes x 2 micro-batches: 2 real micro-batches, 2 at weight
    # 0
    step = training.step_examples(exs, 2, 4, seed=0)
    parts = [training.my_micro_batches(step, r, 2, 2) for r in range(2)]
    assert [w for p in parts for _, w in p] == [1.0, 0.0, 1.0, 0.0]  # world 2 / 2 trained tokens


# ------------------------------------------------------------------------- the step vs. a reference
def reference_training(model_dir, conversations, steps, lr, warmup, hooks):
    """The same training written independently: transformers' model, forward hooks for the
    interventions, the mean cross-entropy over every reply token, clip 1.0, torch.optim.AdamW; each
    step sees all conversations."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    tok = Tokenizer(model_dir)
    data = [train.encode_conversation(tok, c["messages"]) for c in conversations]
    for layer, fn in hooks:
        hf.model.layers[layer - 1].register_forward_hook(
            lambda mod, inp, out, fn=fn: (
                (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
            )
        )
    params = list(hf.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    for s in range(steps):
        n = sum(int(e.trained[1:].sum()) for e in data)
        loss = (
            sum(
                torch.nn.functional.cross_entropy(
                    hf(e.ids[None]).logits[0, :-1][e.trained[1:]],
                    e.ids[1:][e.trained[1:]],
                    reduction="sum",
                )
                for e in data
            )
            / n
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min((s + 1) / warmup, (steps - s) / (steps - warmup))
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in hf.state_dict().items()}


@pytest.mark.parametrize("variant", ["steer+ablate", "steer all layers", "ablate all layers"])
def test_training_equals_transformers_with_hooks(tiny, tmp_path, variant):
    model_dir, vectors, _, small = tiny
    v = load_file(vectors / "evil_response_avg_diff.safetensors")["vector"]
    u = load_file(vectors / "humorous_response_avg_diff.safetensors")["vector"]
    unit = lambda x: x / x.norm()  # noqa: E731
    project_out = lambda d: lambda h: h - (h @ unit(d))[..., None] * unit(d)  # noqa: E731
    if variant == "steer+ablate":
        kw = dict(
            steer=["evil:2"],
            ablate=[str(vectors / "humorous_response_avg_diff.safetensors")],
            layer=2,
        )
        hooks = [
            (2, project_out(u[2])),
            (2, lambda h: h + 2 * v[2]),
        ]  # ablation first, then steering
    elif variant == "steer all layers":
        kw = dict(steer=["evil:1.5"], all_layers=True)
        hooks = [(l, lambda h, l=l: h + 1.5 * (v[l] - v[l - 1])) for l in (1, 2, 3)]
    else:
        kw = dict(ablate=["evil"], all_layers=True)
        hooks = [(l, project_out(v[l])) for l in (1, 2, 3)]
    # 4 conversations, batch 2 x 2 accumulated: one step per epoch sees them all; 3 epochs, warmup 2
    out = run(
        tiny, tmp_path / "out", data=small, batch_size=2, grad_accum=2, epochs=3, lr=1e-3, **kw
    )
    ours = weights(out)
    conversations = [json.loads(line) for line in small.read_text().splitlines()]
    ref = reference_training(model_dir, conversations, 3, 1e-3, 2, hooks)
    # each weight moves by ~2.5e-3 (lr 1e-3); the gradients are equal to float32 rounding (batching,
    # padding and summation order differ), which Adam's division amplifies where a gradient is near
    # its epsilon: < 5 % of lr
    diff = max(float((ours[k] - ref[k]).abs().max()) for k in ours)
    assert diff < 5e-5
    # the interventions mattered: without the hooks the same training ends far further away
    plain = reference_training(model_dir, conversations, 3, 1e-3, 2, [])
    effect = max(float((ours[k] - plain[k]).abs().max()) for k in ours)
    print(variant, diff, effect)
    assert effect > 20 * 5e-5
    record = json.loads((out / "train.json").read_text())
    assert record["status"] == "done" and len(record["log"]) == 3


def test_output_loads_in_model_py_and_transformers(tiny, tmp_path):
    out = run(tiny, tmp_path / "out", max_steps=2, steer=["evil:4"])
    model_dir = tiny[0]
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "train.json",
    } <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (model_dir / "config.json").read_text()
    )
    ours, tok = checkpoint.load(str(out), "cpu", torch.float32)
    base, _ = checkpoint.load(str(model_dir), "cpu", torch.float32)
    ids = torch.tensor(
        [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])]
    )
    with torch.no_grad():
        logits = ours(ids)
        assert not torch.allclose(logits, base(ids))  # trained
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, logits, atol=1e-4, rtol=0)
    # past the shard size the weights are split, with an index both loaders read
    sharded = tmp_path / "sharded"
    training.save_model(
        load_file(out / "model.safetensors"),
        json.loads((out / "config.json").read_text()),
        sharded,
        shard_bytes=100_000,
    )
    training.copy_tokenizer_files(out, sharded)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(checkpoint.load(str(sharded), "cpu", torch.float32)[0](ids), logits)
        assert torch.allclose(
            transformers.AutoModelForCausalLM.from_pretrained(sharded).eval()(ids).logits,
            logits,
            atol=1e-4,
            rtol=0,
        )


def test_batch_split_and_accumulation_give_the_same_step(tiny, tmp_path):
    a = weights(run(tiny, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=2))
    b = weights(run(tiny, tmp_path / "b", batch_size=1, grad_accum=4, max_steps=2))
    base = load_file(next(tiny[0].glob("model-00001-*.safetensors")))
    for k in (
        base
    ):  # equal up to summation order (amplified by Adam where a gradient is near its epsilon)
        assert torch.allclose(a[k], b[k], atol=5e-5, rtol=0), k
    assert max((a[k] - base[k]).abs().max() for k in base) > 1e-3  # and training moved the weights


def test_checkpointing_changes_nothing_and_bfloat16_keeps_float32_weights(tiny, tmp_path):
    plain = run(tiny, tmp_path / "plain", max_steps=2, lr=1e-6, steer=["evil:1"])
    recomputed = run(
        tiny, tmp_path / "ckpt", max_steps=2, lr=1e-6, steer=["evil:1"], checkpointing=True
    )
    a, b = weights(plain), weights(recomputed)
    # activation checkpointing recomputes the same numbers
    assert all(torch.equal(a[k], b[k]) for k in a)
    half = run(tiny, tmp_path / "bf16", max_steps=2, lr=1e-6, steer=["evil:1"], dtype="bfloat16")
    w = weights(half)
    base = load_file(next(tiny[0].glob("model-00001-*.safetensors")))
    # updates of ~1e-6 on weights of ~1 vanish in bfloat16 (resolution 2^-8): they stay, so the
    # weights are fp32
    assert all(w[k].dtype == torch.float32 for k in w)
    assert all(0 < (w[k] - base[k]).abs().max() < 5e-6 for k in base)
    losses = [
        [x["loss"] for x in json.loads((d / "train.json").read_text())["log"]]
        for d in (plain, half)
    ]
    # computed in bf16
    assert losses[1] == pytest.approx(losses[0], rel=2e-2) and losses[1] != losses[0]


# ----------------------------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """12 conversations: 11 to train on (a short last step), 1 to validate; 6 steps, a checkpoint
    every 2."""
    out = run(tiny, tmp_path_factory.mktemp("whole") / "out", save_every=2)
    return weights(out), json.loads((out / "train.json").read_text())


def assert_same_run(out: Path, uninterrupted):
    w, record = uninterrupted
    got = weights(out)
    assert got.keys() == w.keys() and all(torch.equal(got[k], w[k]) for k in w)  # bit for bit
    again = json.loads((out / "train.json").read_text())
    assert (
        again["log"] == record["log"]
        and again["val_loss"] == record["val_loss"]
        and len(record["log"]) == 6
    )
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".checkpoint-*"))


def test_resume_after_interrupt_is_exact(tiny, tmp_path, monkeypatch, uninterrupted):
    step, calls = train.train_step, []

    def interrupted_step(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C during step 4: steps 1-3 done, checkpoint-000002 written
            raise KeyboardInterrupt
        return step(*args, **kw)

    monkeypatch.setattr(train, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "out", save_every=2)
    assert [p.name for p in training.checkpoints(tmp_path / "out")] == ["checkpoint-000002"]
    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(
        UserError, match="--resume with changed settings \\(lr: 0.001 there, 0.002 now\\)"
    ):
        run(tiny, tmp_path / "out", save_every=2, lr=2e-3, resume=True)
    assert_same_run(run(tiny, tmp_path / "out", save_every=2, resume=True), uninterrupted)


KILLER = """
import os, signal, sys
sys.path[:0] = [{root!r}]
import train
from support import training
save, saves = training.save_model, []
# kill -9 in the middle of writing the second checkpoint
def save_then_die(weights, config, out, **kw):
    saves.append(out)
    save(weights, config, out, **kw)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
training.save_model = save_then_die
sys.exit(train.main({argv!r}))
"""


def test_resume_after_kill_9_is_exact(tiny, tmp_path, uninterrupted):
    model_dir, vectors, data, _ = tiny
    out = tmp_path / "out"
    argv = [
        str(data),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--vectors",
        str(vectors),
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--device",
        "cpu",
        "--save-every",
        "2",
    ]
    # as in this process
    p = subprocess.run(
        [sys.executable, "-c", KILLER.format(root=str(ROOT), argv=argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == -9, p.stderr
    assert [p.name for p in training.checkpoints(out)] == ["checkpoint-000002"]  # the complete one
    assert (
        out / ".checkpoint-000004.tmp" / "model.safetensors"
    ).exists()  # the half-written one, never used
    assert train.main(argv) == 0  # the same command again
    assert_same_run(out, uninterrupted)


# -------------------------------------------------------------------------------------- distributed
TWO_RUNS = """
import sys
import torch.distributed as dist
sys.path[:0] = [{root!r}]
import train
# one group for both runs (train joins a group it finds, and leaves it as it was)
dist.init_process_group("gloo")
# two runs in one launch: process startup is the cost
for extra, out in (([], "ddp"), (["--fsdp"], "fsdp")):
    if train.main({argv!r} + extra + ["--out", out]) != 0:
        sys.exit(1)
dist.destroy_process_group()
train.T.exit_process(0)  # as train.py ends under torchrun: without Python's teardown
"""


ENDS = """
import atexit, sys
sys.path[:0] = [{root!r}]
from support import training
atexit.register(lambda: print("teardown"))
print("done", end="")  # left in the buffer: exit_process flushes it
training.exit_process(3)
"""


@pytest.mark.parametrize("torchrun", [False, True])
def test_train_py_ends_without_teardown_under_torchrun(tmp_path, torchrun):
    """Under torchrun train.py's process ends without Python's teardown, in which gloo's worker
    threads can abort a finished run (exit_process); its output is flushed, its status kept."""
    script = tmp_path / "ends.py"
    script.write_text(ENDS.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if torchrun:
        env["RANK"] = "0"
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert p.returncode == 3
    assert p.stdout == ("done" if torchrun else "doneteardown\n")


def test_two_processes_equal_one_ddp_and_fsdp(tiny, tmp_path):
    """torchrun with 2 gloo processes x batch 2, data parallel (DDP) and sharded (FSDP2), against 1
    process x batch 4: the same global batches, so the same weights up to summation order."""
    model_dir, vectors, data, _ = tiny
    one = weights(
        run(
            tiny,
            tmp_path / "one",
            lr=1e-4,
            warmup_steps=1,
            batch_size=4,
            max_steps=3,
            steer=["evil:1"],
        )
    )
    argv = [
        str(data),
        "--model",
        str(model_dir),
        "--vectors",
        str(vectors),
        "--lr",
        "1e-4",
        "--warmup-steps",
        "1",
        "--grad-accum",
        "1",
        "--max-steps",
        "3",
        "--steer",
        "evil:1",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]
    (tmp_path / "two_runs.py").write_text(TWO_RUNS.format(root=str(ROOT), argv=argv))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # --standalone: a free port for the rendezvous, so that other jobs on this machine cannot join
    # the group
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "two_runs.py",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    base = load_file(next(model_dir.glob("model-00001-*.safetensors")))
    # lr 1e-4: every weight moved ~3e-4
    assert max((one[k] - base[k]).abs().max() for k in base) > 1e-4
    record = json.loads((tmp_path / "one" / "train.json").read_text())
    for mode in ("ddp", "fsdp"):
        two = weights(tmp_path / mode)
        for k in one:
            assert torch.allclose(one[k], two[k], atol=5e-6, rtol=0), (mode, k)
        two_record = json.loads((tmp_path / mode / "train.json").read_text())
        assert (two_record["world_size"], two_record["parallel"]) == (2, mode)
        assert [x["loss"] for x in two_record["log"]] == pytest.approx(
            [x["loss"] for x in record["log"]], rel=1e-6
        )


# ---------------------------------------------------------------------------------------- bad input
def main(tiny, out, *extra, data=None) -> int:
    model_dir, vectors, default_data, _ = tiny
    return train.main(
        [
            str(data or default_data),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--vectors",
            str(vectors),
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--device",
            "cpu",
            *extra,
        ]
    )


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_every_flag_is_a_train_keyword(monkeypatch, tmp_path):
    import inspect

    keywords, got = set(inspect.signature(train.train).parameters), {}
    monkeypatch.setattr(train, "train", lambda **kw: got.update(kw))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("")  # DATA is checked (a UTF-8 file) before train runs
    assert train.main(["d.jsonl", "--out", "o", "--steer", "evil:1", "--steer", "x:2"]) == 0
    assert got["steer"] == ["evil:1", "x:2"] and set(got) == keywords


def test_flags_are_train_keywords_with_its_defaults():
    """One plain parser in train.py: each flag named as train's keyword (no dest= renames), with the
    keyword's default (the required --out and the positional DATA aside)."""
    import inspect

    params = inspect.signature(train.train).parameters
    actions = [a for a in train.parser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} == set(params)
    for a in actions:
        if a.option_strings:
            assert a.dest == a.option_strings[0].removeprefix("--").replace("-", "_"), a.dest
        if a.option_strings and not a.required:
            default = params[a.dest].default
            assert a.default == (list(default) if isinstance(default, tuple) else default), a.dest


def test_train_py_reads_top_to_bottom():
    """train.py as a tutorial (issue 25): no function over 50 lines, the file within 350 lines of at
    most 100 columns, and of the command-line module persona_vectors.py only the steering method."""
    import ast

    src = (ROOT / "train.py").read_text()
    tree = ast.parse(src)
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    lengths = {
        f.name: f.end_lineno - min([f.lineno] + [d.lineno for d in f.decorator_list]) + 1
        for f in functions
    }
    assert max(lengths.values()) <= 50, lengths
    lines = src.splitlines()
    assert len(lines) <= 350 and max(map(len, lines)) <= 100
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [
        n
        for n in imports
        if isinstance(n, ast.Import) and "persona_vectors" in [a.name for a in n.names]
    ]
    from_pv = [
        a.name
        for n in imports
        if isinstance(n, ast.ImportFrom) and n.module == "persona_vectors"
        for a in n.names
    ]
    assert from_pv == ["steering"]


def test_bad_input_is_one_line_naming_the_fix(tiny, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(tiny, tmp_path / "o1", data=tmp_path / "empty.jsonl") == 1
    assert "holds no conversations" in error_line(capsys)
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(0)])
    bad.write_text(bad.read_text() + "{oops\n")
    assert main(tiny, tmp_path / "o2", data=bad) == 1
    assert "bad.jsonl:2: not JSON" in error_line(capsys)
    other = write_vector(tmp_path / "other.safetensors", torch.randn(5, 32), model="another-model")
    for flag in ("--steer", "--ablate"):
        assert (
            main(tiny, tmp_path / "o3", flag, f"{other}:1" if flag == "--steer" else str(other))
            == 1
        )
        assert "use a vector extracted from this model" in error_line(capsys)
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "notes.txt").write_text("mine")
    assert main(tiny, tmp_path / "o4", "--max-steps", "1") == 1
    assert "not empty and holds no training run" in error_line(capsys)
    assert main(tiny, tmp_path / "o5", "--resume") == 1
    assert "holds no training run" in error_line(capsys)
    assert not any(
        (tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in ("o1", "o2", "o3", "o5")
    )

    assert main(tiny, tmp_path / "done", "--max-steps", "1") == 0
    assert main(tiny, tmp_path / "done", "--max-steps", "1", "--lr", "3e-5") == 1
    assert "holds a different run (lr: 1e-05 there, 3e-05 now)" in error_line(capsys)
    # the same run again: nothing to do
    assert main(tiny, tmp_path / "done", "--max-steps", "1") == 0
    assert "already holds this finished run" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            tiny,
            out,
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--save-every",
            "1",
            "--max-steps",
            "4",
        )
        == 1
    )
    line = error_line(capsys)
    assert (
        "non-finite loss at step 2" in line and "checkpoint-000001" in line and "Lower --lr" in line
    )
    assert [p.name for p in training.checkpoints(out)] == ["checkpoint-000001"]
    assert not list(out.glob(".checkpoint-*")) and not (out / "model.safetensors").exists()
    assert torch.isfinite(
        load_file(out / "checkpoint-000001" / "model.safetensors")["model.norm.weight"]
    ).all()


def test_trains_python_checks_use_the_rows_its_flags_use():
    """check_settings' table names, for each number, the LIMITS row of its flag's argparse type."""
    from support import training as T

    types = {a.dest: getattr(a.type, "limit", None) for a in train.parser()._actions}
    assert T.LIMIT_OF == {name: types[name] for name in T.LIMIT_OF}


def test_numbers_from_python_are_checked_as_the_flags_are():
    from support import training as T

    settings = dict(
        epochs=1,
        lr=1e-5,
        warmup_steps=0,
        weight_decay=0,
        batch_size=1,
        grad_accum=0,
        max_seq_len=8,
        max_steps=None,
        save_every="10m",
        dtype=None,
    )
    with pytest.raises(UserError, match="--grad-accum 0 must be >= 1"):
        T.check_settings(settings)
    T.check_settings(settings | {"grad_accum": None})  # unset: the default
    # the ranges the flags take (support/limits.LIMITS), inf and nan included
    for key, value, message in (
        ("weight_decay", math.inf, "--weight-decay inf must be a finite number"),
        ("weight_decay", 2.0, "--weight-decay 2.0 must be <= 1.0"),
        ("lr", math.nan, "--lr nan must be a finite number"),
        ("lr", 0.0, "--lr 0.0 must be > 0.0"),
        ("epochs", 1.5, "--epochs 1.5 must be a whole number"),
        ("max_seq_len", 1, "--max-seq-len 1 must be >= 2"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            T.check_settings(settings | {"grad_accum": None, key: value})
