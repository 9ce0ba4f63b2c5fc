"""Issue 17, vectors: export-gguf, import-gguf and import-vector on bad input (one line, nothing
written, no input written over), and the recorded-model check every command that loads a vector
makes (a warning, once per file)."""

import pytest
import torch
from test_train import conversation, write_jsonl
from tiny import main_of, make_tiny_chat_model, run_bad, tiny_model_with_vectors, tree, write_vector

import apps.control_vector as cv
import model as M
import persona_vectors as pv
import train
from support import files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, vectors = tiny_model_with_vectors(tmp_path_factory.mktemp("edges"))
    root = d.parent
    write_vector(root / "self.safetensors", torch.randn(4, 64), model=str(d), trait="self")
    write_vector(
        root / "big_response_avg_diff.safetensors",
        10 * torch.ones(4, 64),
        model=str(d),
        trait="big",
    )
    cv.export_gguf(
        str(vectors / "evil_response_avg_diff.safetensors"), str(root / "evil.gguf"), layer=2
    )
    torch.save(torch.full((4, 64), float("nan")), root / "nan_response_avg_diff.pt")
    torch.save(torch.randn(5, 64), root / "five_response_avg_diff.pt")
    torch.save(torch.randn(4, 32), root / "narrow_response_avg_diff.pt")
    torch.save(torch.randn(4, 64), root / "good_response_avg_diff.pt")
    # a torch file under the name import-vector writes
    torch.save(torch.randn(4, 64), root / "same.safetensors")
    (root / "text_response_avg_diff.pt").write_text("not a tensor, just some text\n")
    (root / "adir").mkdir()
    return d, vectors, root


E = "{v}/evil_response_avg_diff.safetensors"
# (arguments, exit code, what the one-line message must say); {d} = tiny model, {v} = its vectors,
# {r} = test folder
CASES = [
    # 4: --out a directory, even with --force; and never the input itself
    (f"export-gguf {E} --layer 2 --out {{r}}/adir --force", 1, "is a directory"),
    (
        "export-gguf {r}/self.safetensors --layer 2 --out {r}/self.safetensors --force",
        1,
        "is an input of this run",
    ),
    # 5, 9: coefficients whose products leave float32 (the file's type)
    (f"export-gguf {E} --layer 2 --out {{r}}/x.gguf --coef 1e39", 1, "beyond float32's range"),
    (
        "export-gguf {r}/big_response_avg_diff.safetensors --layer 2 --out {r}/x.gguf --coef 1e38",
        1,
        "beyond float32's range",
    ),
    # 10: import-vector checks what it writes
    ("import-vector {r}/nan_response_avg_diff.pt --out {r}/out", 1, "non-finite values"),
    ("import-vector {r}/five_response_avg_diff.pt --model {d} --out {r}/out", 1, "needs [4, 64]"),
    ("import-vector {r}/narrow_response_avg_diff.pt --model {d} --out {r}/out", 1, "needs [4, 64]"),
    (
        "import-vector {r}/good_response_avg_diff.pt --model /nonexistent --out {r}/out",
        1,
        "neither a local directory nor a hub id",
    ),
    ("import-vector {r}/same.safetensors --force", 1, "is an input of this run"),
    # 20: what a text file is
    ("import-vector {r}/text_response_avg_diff.pt --out {r}/out", 1, "is not a torch file"),
    # 11: names are names
    ("import-gguf {r}/evil.gguf --model {d} --name ../../escaped --out {r}/out", 1, "(not a path)"),
    ("import-gguf {r}/evil.gguf --model {d} --name .. --out {r}/out", 1, "(not a path)"),
    ("import-gguf {r}/evil.gguf --model {d} --name a/b --out {r}/out", 1, "(not a path)"),
    ("import-gguf {r}/evil.gguf --model {d} --name= --out {r}/out", 1, "(not a path)"),
    # 20: the steering limit in the unit the user gave (relative here)
    ("generate Hi --model {d} --vectors {v} --steer evil:2.2e3r", 1, "at most 100r in size"),
]


@pytest.mark.parametrize(
    "argv, code, message", CASES, ids=[c[0].split(" {")[0] + " " + c[2][:30] for c in CASES]
)
def test_bad_input(tiny, argv, code, message, monkeypatch, capsys, tmp_path):
    d, vectors, root = tiny
    monkeypatch.chdir(tmp_path)  # anything written to the default places would land here
    monkeypatch.setattr(
        M, "generate", lambda *a, **k: pytest.fail("generation started before the check")
    )
    before = tree(root)
    capsys.readouterr()
    args = argv.format(d=d, v=vectors, r=root).split()
    err = run_bad(main_of(args), args, code, capsys)
    assert [x for x in err if x.startswith("error:")] == err[-1:], err
    # generate: loading lines
    assert message in err[-1] and (len(err) == 1 or argv.startswith("generate")), err
    # not even an empty folder
    assert list(tmp_path.iterdir()) == [] and not (root / "out").exists()
    assert tree(root) == before
    assert not (root.parent.parent / "escaped_response_avg_diff.safetensors").exists()


def test_names_that_are_names_pass(tiny, tmp_path):
    d, vectors, root = tiny
    for name in ("evil2", "My-Vec.v2", "a_b"):
        assert (
            cv.import_gguf(str(root / "evil.gguf"), str(d), name=name, out=str(tmp_path)).parent
            == tmp_path
        )


def test_largest_coefficient_offered_is_accepted(tiny, tmp_path, capsys):
    d, vectors, root = tiny
    big = str(root / "big_response_avg_diff.safetensors")
    with pytest.raises(ValueError) as e:
        cv.export_gguf(big, str(tmp_path / "x.gguf"), layer=2, coef=1e38)
    limit = float(str(e.value).split("at most ")[1].split()[0])
    out = cv.export_gguf(big, str(tmp_path / "x.gguf"), layer=2, coef=limit)
    assert out.is_file() and float(cv.read_control_vector(out, 3, 64)[0][2].max()) == pytest.approx(
        10 * limit
    )


# --------------------------------------------------------------------------------------------------
# 14: a vector recorded for another model warns once, one line; the same model, or shift's finetune,
# does not


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_generate_warns_once_per_file_of_another_model(tiny, tmp_path, capsys):
    d, vectors, root = tiny
    other = write_vector(tmp_path / "other.safetensors", torch.randn(4, 64), model="someone/else")
    argv = [
        "generate",
        "Hi",
        "there",
        "--model",
        str(d),
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]
    assert pv.main(argv + ["--steer", f"{other}:1", "--steer", f"{other}:-1"]) == 0
    (line,) = warnings_in(capsys.readouterr().err)
    assert str(other) in line and "someone/else" in line and str(d) in line
    # recorded for this model
    assert pv.main(argv + ["--vectors", str(vectors), "--steer", "evil:1"]) == 0
    assert warnings_in(capsys.readouterr().err) == []


def test_train_warns_for_a_vector_of_another_model(tiny, tmp_path, capsys):
    d, vectors, root = tiny
    mine = tmp_path / "vectors"
    mine.mkdir()
    write_vector(
        mine / "evil_response_avg_diff.safetensors", torch.randn(4, 64), model="someone/else"
    )
    data = write_jsonl(tmp_path / "data.jsonl", [conversation(i) for i in range(4)])

    def run(vectors_dir, out):
        return train.main(
            [
                str(data),
                "--model",
                str(d),
                "--out",
                str(tmp_path / out),
                "--vectors",
                str(vectors_dir),
                "--steer",
                "evil:1",
                "--batch-size",
                "2",
                "--max-steps",
                "1",
                "--device",
                "cpu",
            ]
        )

    assert run(mine, "a") == 0
    (line,) = warnings_in(capsys.readouterr().err)
    assert "someone/else" in line
    assert run(vectors, "b") == 0
    assert warnings_in(capsys.readouterr().err) == []


def test_shift_uses_the_base_vector_on_its_finetune_without_warning(tiny, tmp_path, capsys):
    d, vectors, root = tiny
    tuned = make_tiny_chat_model(tmp_path / "tuned", seed=5)
    pv.shift(
        "evil",
        finetuned=str(tuned),
        base=str(d),
        vectors=str(vectors),
        out=str(tmp_path / "s.csv"),
        random=2,
        device="cpu",
    )
    assert warnings_in(capsys.readouterr().err) == []


def test_same_model_by_another_name_or_by_its_folder(tiny, tmp_path, capsys, monkeypatch):
    d, vectors, root = tiny
    monkeypatch.chdir(d.parent)
    model = type(
        "Model", (), {"name_or_path": "model", "source_dir": d}
    )()  # ./model, as the user typed it
    files.check_model({"model": str(d)}, tmp_path / "a.safetensors", model)
    files.check_model({"model": "hub/id", "model_path": str(d)}, tmp_path / "b.safetensors", model)
    files.check_model({"model": "unknown"}, tmp_path / "c.safetensors", model)
    assert warnings_in(capsys.readouterr().err) == []
    files.check_model({"model": "hub/id"}, tmp_path / "d.safetensors", "other/id")
    assert len(warnings_in(capsys.readouterr().err)) == 1
