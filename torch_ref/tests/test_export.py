"""ONNX export: onnxruntime computes the logits predict computes, from uint8 images of any
batch size, and the file says what it expects."""

import json

import numpy as np
import pytest

from core import readers
from torch_ref import export, predict as torch_predict
from torch_ref.tests.test_train import recipe_for
from torch_ref.train import train_and_evaluate

ort = pytest.importorskip("onnxruntime")  # installed by scripts/setup.sh (the export extra)


def test_export_equals_predict_and_refuses_to_overwrite(fashion_dir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = recipe_for("fashion_mnist", fashion_dir, "epochs=1")
    train_and_evaluate(recipe, run, "cpu")
    out = tmp_path / "model.onnx"
    assert export.main(["--workdir", str(run), "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = readers.read_fashion_mnist(fashion_dir, train=False).images  # 40 uint8 images
    want = torch_predict.load(recipe, None, run, "cpu")[0](images)
    for batch in (images[:1], images[:7], images):  # the batch axis is dynamic
        got = session.run(None, {"images": batch})[0]
        assert np.abs(got - want[: len(batch)]).max() < export.BOUND * np.abs(want).max()
    meta = session.get_modelmeta().custom_metadata_map
    assert (
        "(batch, 28, 28, 1)" in meta["input"] and json.loads(meta["class_names"])[9] == "Ankle boot"
    )
    assert meta["preprocessing"].startswith("decode, turn upright by its EXIF orientation")
    before = out.read_bytes()
    capsys.readouterr()
    assert export.main(["--workdir", str(run), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert export.main(["--workdir", str(run), "--out", str(tmp_path), "--force"]) == 2
    assert (
        f"--out {tmp_path} is a folder; --out must name the file to write, e.g. --out "
        f"{tmp_path / 'model.onnx'}"
    ) in capsys.readouterr().err
    assert (
        export.main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x.onnx")]) == 2
    )
    assert "is not a run folder" in capsys.readouterr().err
