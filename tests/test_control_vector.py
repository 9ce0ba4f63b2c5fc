"""Tests for apps/control_vector.py: the GGUF writer, export-gguf / import-gguf, the layer rules and
bad input.

The tiny random chat model (3 blocks, hidden 64) stands in for a real one; tests/test_llama_cpp.py
checks the layer mapping against a real llama.cpp. Bad files are built with the independent test
writer of tests/test_gguf.py.
"""

import doctest
import struct

import numpy as np
import pytest
import torch
from test_gguf import write_gguf as write_test_gguf
from tiny import make_tiny_chat_model, write_vector

import apps.control_vector as cv
from apps import __main__ as apps_cli
from support import UserError, checkpoint
from support.files import load_vector
from support.gguf_convert import GGUFFile

F32, F16 = 0, 1


def cli(argv: list[str]) -> int:
    """The applications' command line (python -m apps): UserError -> one line 'error: ...' and 1."""
    return apps_cli.main(argv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def vec_file(tmp_path, tiny):
    # [N + 1, hidden], N = 3 blocks
    vec = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    return write_vector(
        tmp_path / "evil_response_avg_diff.safetensors", vec, model=str(tiny), trait="evil"
    ), vec


def test_docstring_examples():
    assert doctest.testmod(cv).failed == 0


def test_writer_layout_is_gguf_v3_with_aligned_f32_data(tmp_path):
    a = np.arange(5, dtype=np.float32)
    path = cv.write_gguf(
        tmp_path / "x.gguf",
        {"general.architecture": "controlvector", "n": 3, "f": 0.5, "l": [1, 2]},
        {"direction.1": a},
    )
    raw = path.read_bytes()
    assert raw[:4] == b"GGUF" and struct.unpack("<IQQ", raw[4:24]) == (3, 1, 4)
    g = GGUFFile(path)
    assert g.metadata == {"general.architecture": "controlvector", "n": 3, "f": 0.5, "l": [1, 2]}
    info = g.tensors["direction.1"]
    assert info.shape == (5,) and info.ggml_type == F32 and info.offset % 32 == 0
    assert g.dequantize("direction.1").tobytes() == a.tobytes()


def test_export_import_round_trip_is_exact(tmp_path, tiny, vec_file, capsys):
    path, vec = vec_file
    out = tmp_path / "evil.gguf"
    assert cli(["export-gguf", str(path), "--layers", "2-3", "--out", str(out)]) == 0
    g = GGUFFile(out)
    assert g.metadata["general.architecture"] == "controlvector"
    assert (
        g.metadata["controlvector.model_hint"] == "llama"
        and g.metadata["controlvector.layer_count"] == 2
    )
    assert sorted(g.tensors) == ["direction.1", "direction.2"]  # our layers 2 and 3
    assert g.dequantize("direction.1").tobytes() == vec[2].numpy().tobytes()
    assert g.dequantize("direction.2").tobytes() == vec[3].numpy().tobytes()

    assert (
        cli(["import-gguf", str(out), "--model", str(tiny), "--out", str(tmp_path / "vectors")])
        == 0
    )
    back, meta = load_vector(tmp_path / "vectors" / "evil_response_avg_diff.safetensors")
    assert torch.equal(back[2:], vec[2:])  # bit for bit
    assert not back[:2].any()  # the embeddings and block 1 have no llama.cpp counterpart
    assert meta["control_vector_layers"] == [2, 3] and "best_layer" not in meta


def test_single_layer_with_coef_and_its_import_records_the_layer(tmp_path, tiny, vec_file):
    path, vec = vec_file
    out = tmp_path / "evil_L3.gguf"
    assert cli(["export-gguf", str(path), "--layer", "3", "--coef", "2", "--out", str(out)]) == 0
    g = GGUFFile(out)
    assert list(g.tensors) == ["direction.2"] and g.metadata["persona_vectors.hidden_layers"] == [3]
    assert np.array_equal(g.dequantize("direction.2"), 2 * vec[3].numpy())
    dest = cv.import_gguf(str(out), str(tiny), out=str(tmp_path / "v"))
    back, meta = load_vector(dest)
    assert dest.name == "evil_L3_response_avg_diff.safetensors" and meta["best_layer"] == 3
    assert torch.equal(back[3], 2 * vec[3]) and not back[:3].any()


def test_default_layer_is_the_best_layer_else_the_middle(tmp_path, tiny):
    vec = torch.randn(4, 64)
    best = write_vector(
        tmp_path / "a_response_avg_diff.safetensors", vec, model=str(tiny), best_layer=3
    )
    middle = write_vector(tmp_path / "b_response_avg_diff.safetensors", vec, model=str(tiny))
    assert list(GGUFFile(cv.export_gguf(str(best))).tensors) == ["direction.2"]
    with pytest.raises(
        UserError, match="--layer 1 is outside"
    ):  # the middle of 3 blocks is 1: not exportable
        cv.export_gguf(str(middle))


def test_import_is_where_generate_looks(tmp_path, tiny, vec_file, monkeypatch):
    """`generate --steer NAME:COEF` finds the imported vector by name and steers its layer by
    default."""
    import persona_vectors as pv

    path, vec = vec_file
    monkeypatch.chdir(tmp_path)
    gguf = cv.export_gguf(str(path), str(tmp_path / "mine.gguf"), layer=2)
    cv.import_gguf(str(gguf), str(tiny))
    model, _ = checkpoint.load(str(tiny), "cpu", torch.float32)
    (steer,) = pv.steering(["mine:1.5"], model)
    assert steer.layer == 2 and steer.coef == 1.5 and torch.equal(steer.vector, vec[2])


def test_all_layers_exports_increments_and_cumulative_import_restores_the_totals(
    tmp_path, tiny, vec_file
):
    path, vec = vec_file
    out = cv.export_gguf(str(path), str(tmp_path / "all.gguf"), all_layers=True)
    g = GGUFFile(out)
    assert sorted(g.tensors) == ["direction.1", "direction.2"]
    # block 1's increment v[1] - v[0] cannot be added after block 1 in llama.cpp: it joins block 2's
    assert np.array_equal(g.dequantize("direction.1"), (vec[2] - vec[0]).numpy())
    assert np.array_equal(g.dequantize("direction.2"), (vec[3] - vec[2]).numpy())
    back, meta = load_vector(
        cv.import_gguf(str(out), str(tiny), out=str(tmp_path / "v"), cumulative=True)
    )
    # with --all-layers, ours adds back[l] - back[l-1] after block l: from block 2 on the totals are
    # v[l] - v[0]
    assert (
        torch.allclose(back[2:], vec[2:] - vec[0], atol=1e-6)
        and not back[:2].any()
        and meta["cumulative"]
    )


def test_official_vectors_never_export_their_normed_last_row(tmp_path, tiny):
    vec = torch.randn(4, 64)
    # as import-vector writes it
    path = write_vector(
        tmp_path / "evil_response_avg_diff.safetensors",
        vec,
        model=str(tiny),
        imported_from="evil_response_avg_diff.pt",
        last_row_post_norm=True,
    )
    with pytest.raises(UserError, match="after the final norm"):
        cv.export_gguf(str(path), str(tmp_path / "x.gguf"), layer=3)
    g = GGUFFile(cv.export_gguf(str(path), str(tmp_path / "y.gguf"), all_layers=True))
    assert sorted(g.tensors) == ["direction.1"]


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the fix, exit 1, nothing written.


def one_line_error(capsys, argv, *expected, unwritten=()):
    capsys.readouterr()  # what earlier calls printed
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for e in expected:
        assert e in err, err
    for p in unwritten:
        assert not p.exists()
    return err


def test_export_bad_input(tmp_path, tiny, vec_file, capsys):
    path, vec = vec_file
    out = tmp_path / "out.gguf"
    wrong = write_vector(
        tmp_path / "w_response_avg_diff.safetensors", torch.randn(4, 32), model="other"
    )
    one_line_error(
        capsys,
        ["export-gguf", str(wrong), "--model", str(tiny), "--layer", "2", "--out", str(out)],
        "[4, 32]",
        "this model needs [4, 64]",
        unwritten=[out],
    )
    for layer in ("0", "1"):
        one_line_error(
            capsys,
            ["export-gguf", str(path), "--layer", layer, "--out", str(out)],
            "outside the exportable layers 2..3",
            "refuses direction.0",
            unwritten=[out],
        )
    one_line_error(
        capsys,
        ["export-gguf", str(path), "--layer", "4", "--out", str(out)],
        "2..3",
        unwritten=[out],
    )
    one_line_error(
        capsys,
        ["export-gguf", str(path), "--layers", "1-3", "--out", str(out)],
        "2..3",
        unwritten=[out],
    )
    one_line_error(
        capsys,
        ["export-gguf", str(path), "--layers", "3-2", "--out", str(out)],
        "A-B",
        unwritten=[out],
    )
    one_line_error(
        capsys,
        ["export-gguf", str(tmp_path / "none.safetensors"), "--out", str(out)],
        "no vector file",
    )
    unknown = write_vector(tmp_path / "u_response_avg_diff.safetensors", vec, model="unknown")
    one_line_error(
        capsys, ["export-gguf", str(unknown), "--out", str(out)], "--model", unwritten=[out]
    )
    out.write_bytes(b"keep")
    one_line_error(capsys, ["export-gguf", str(path), "--layer", "2", "--out", str(out)], "--force")
    assert out.read_bytes() == b"keep"


def direction(name, values, ggml_type=F32, ne=None):
    raw = np.asarray(values, np.float16 if ggml_type == F16 else np.float32).tobytes()
    return name, ggml_type, ne or [len(values)], raw


CV = {"general.architecture": "controlvector", "controlvector.model_hint": "llama"}


@pytest.mark.parametrize(
    "case, tensors, metadata, expected",
    [
        (
            "hidden size",
            [direction("direction.1", np.ones(32))],
            CV,
            ["32 values", "hidden size is 64", "--model"],
        ),
        (
            "layer outside",
            [direction("direction.3", np.ones(64))],
            CV,
            ["direction.3", "3-block", "--model"],
        ),
        (
            "not cvec",
            [direction("direction.1", np.ones(64))],
            {"general.architecture": "llama"},
            ["not a control vector", "'llama'"],
        ),
        ("f16", [direction("direction.1", np.ones(64), F16)], CV, ["F16", "F32"]),
        ("2-D", [direction("direction.1", np.ones(128), ne=[64, 2])], CV, ["[2, 64]", "1-D"]),
        (
            "direction.0",
            [direction("direction.0", np.ones(64))],
            CV,
            ["direction.0", "llama.cpp refuse the whole file"],
        ),
        (
            "other name",
            [direction("token_embd.weight", np.ones(64))],
            CV,
            ["'token_embd.weight'", "direction.N"],
        ),
        ("no tensors", [], CV, ["no direction tensors"]),
    ],
)
def test_import_bad_files(tmp_path, tiny, capsys, case, tensors, metadata, expected):
    path = write_test_gguf(tmp_path / "bad.gguf", tensors, metadata)
    dest = tmp_path / "v" / "bad_response_avg_diff.safetensors"
    one_line_error(
        capsys,
        ["import-gguf", str(path), "--model", str(tiny), "--out", str(tmp_path / "v")],
        *expected,
        unwritten=[dest],
    )


def test_import_truncated_or_not_gguf(tmp_path, tiny, vec_file, capsys):
    path, _ = vec_file
    good = cv.export_gguf(str(path), str(tmp_path / "good.gguf"), layers="2-3")
    dest = tmp_path / "v" / "cut_response_avg_diff.safetensors"
    for size in (
        len(good.read_bytes()) - 100,
        40,
        6,
    ):  # in the data, in the header, inside the magic + version
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(good.read_bytes()[:size])
        one_line_error(
            capsys,
            ["import-gguf", str(cut), "--model", str(tiny), "--out", str(tmp_path / "v")],
            "truncated",
            unwritten=[dest],
        )
    text = tmp_path / "cut.gguf"
    text.write_text("not a gguf at all")
    one_line_error(
        capsys,
        ["import-gguf", str(text), "--model", str(tiny), "--out", str(tmp_path / "v")],
        "not a GGUF file",
        unwritten=[dest],
    )
    one_line_error(
        capsys, ["import-gguf", str(tmp_path / "missing.gguf"), "--model", str(tiny)], "no file"
    )
    cv.import_gguf(str(good), str(tiny), name="cut", out=str(tmp_path / "v"))
    one_line_error(
        capsys,
        [
            "import-gguf",
            str(good),
            "--model",
            str(tiny),
            "--name",
            "cut",
            "--out",
            str(tmp_path / "v"),
        ],
        "exists",
        "--force",
    )


def test_reference_reader_reads_our_file(tmp_path, tiny, vec_file):
    """llama.cpp's own Python GGUF package (gguf-py) reads what our writer wrote."""
    gguf = pytest.importorskip("gguf")
    path, vec = vec_file
    out = cv.export_gguf(str(path), str(tmp_path / "x.gguf"), layers="2-3", coef=-1.5)
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.layer_count"].contents() == 2
    tensors = {t.name: t for t in r.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for name, L in (("direction.1", 2), ("direction.2", 3)):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(tensors[name].data), (-1.5 * vec[L]).numpy())
