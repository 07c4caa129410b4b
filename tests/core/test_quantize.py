"""int8 static quantization: refused where it would not pay off, calibrated on the person's own
imagery, recorded in the model card, and usable like any model (ONNX Runtime only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from helpers import model_with, tiny_unet, write_raster
from tessera.core.cli import main
from tessera.core.errors import ModelError, ParameterError, RasterReadError
from tessera.core.inference.factory import make_predictor
from tessera.core.model.files import TesseraModel, file_sha256
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline.segment import segment_raster
from tessera.core.training import quantize as qz

NOVEC = dict(vectorize=VectorizeParams(enabled=False))


class ConvBrightness(torch.nn.Module):
    """Real convolutions whose classes follow brightness with clear margins: class 0 dark,
    1 mid, 2 bright (band 1 averaged over 3x3; mid = neither far below nor far above 0)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.c2 = torch.nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.c1.weight.zero_()
            self.c1.weight[0, 0] = 1 / 9   # +mean of band 1
            self.c1.weight[1, 0] = -1 / 9  # -mean of band 1
            self.c1.bias.zero_()
            self.c2.weight.copy_(torch.tensor([[0.0, 4.0], [-4.0, -4.0], [4.0, 0.0]])[:, :, None, None])
            self.c2.bias.copy_(torch.tensor([-2.0, 2.0, -2.0]))

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def _scene(h=96, w=128, seed=0):
    """Three brightness zones (dark, mid, bright) with noise, RGB uint8."""
    rng = np.random.default_rng(seed)
    base = np.where(np.arange(w) < w // 3, 30, np.where(np.arange(w) < 2 * w // 3, 128, 225))
    img = np.broadcast_to(base, (3, h, w)).astype(np.int16) + rng.integers(-8, 9, (3, h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def scene(tmp_path):
    return write_raster(tmp_path / "scene.tif", _scene())


def test_int8_is_refused_on_cpus_without_dot_product_instructions(monkeypatch):
    with pytest.raises(ParameterError, match=r"int8 refused: .*avx512_vnni.*slower than fp32"):
        qz.check_int8_cpu({"sse4_2", "avx2", "fma"})
    assert qz.check_int8_cpu({"avx2", "avx512_vnni"}) == "avx512_vnni"
    assert qz.check_int8_cpu({"fp", "asimd", "asimddp"}) == "asimddp"  # Arm dot product
    assert qz.check_int8_cpu({"avx2"}, force=True) == "none found (forced)"
    monkeypatch.setattr(qz, "cpu_flags", lambda: None)
    monkeypatch.setattr(qz.platform, "system", lambda: "Linux")
    with pytest.raises(ParameterError, match="cannot be read"):
        qz.check_int8_cpu()


def test_quantize_writes_an_int8_model_that_segments_like_fp32(tmp_path, scene):
    fp32 = model_with(ConvBrightness(), tile_size=64, overlap=16)
    out = tmp_path / "int8.onnx"
    res = qz.quantize_model(fp32, out, [scene], n_tiles=6, force=True)
    assert out.is_file() and res["sha256"] == file_sha256(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
    assert res["calibration"]["tiles"] == 6 and res["calibration"]["sources"] == [str(scene)]
    assert res["class_agreement_with_fp32"] >= 0.99
    # a Tessera model like any other: contract and card from the ONNX metadata
    m = TesseraModel.open(out)
    assert m.is_onnx and m.contract.name == "tiny test model (int8)"
    assert m.contract.card["quantization"]["calibration"]["tiles"] == 6
    assert m.contract.n_classes == 3 and m.contract.tile_size == 64
    with pytest.raises(ModelError, match="ONNX Runtime only"):
        _ = m.module
    with pytest.raises(ParameterError, match="ONNX Runtime on the CPU only"):
        make_predictor(m, "cpu", "torch")
    pred = make_predictor(m, "auto", "auto")
    assert pred.precision == "int8" and "int8" in pred.info.label
    r8 = segment_raster(scene, m, tmp_path / "o8", SegmentParams(**NOVEC))
    r32 = segment_raster(scene, fp32, tmp_path / "o32", SegmentParams(backend="torch", **NOVEC))
    assert "int8" in r8.device and r8.backend == "onnxruntime"
    with rasterio.open(r8.class_raster) as a, rasterio.open(r32.class_raster) as b:
        c8, c32 = a.read(1), b.read(1)
    assert set(np.unique(c32)) == {0, 1, 2}  # the scene has all three zones
    assert (c8 == c32).mean() >= 0.99


def test_quantizing_a_unet_file_from_the_cli(tmp_path, scene, capsys):
    tiny_unet(seed=1).save(tmp_path / "m.safetensors")
    rc = main(["quantize", str(tmp_path / "m.safetensors"), str(tmp_path / "m8.onnx"),
               "--calibrate", str(scene), "--tiles", "4", "--force", "--json", "-q"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["calibration"]["tiles"] == 4 and res["sha256"] == file_sha256(tmp_path / "m8.onnx")
    # the card in the file holds what the command reported
    card = TesseraModel.open(tmp_path / "m8.onnx").contract.card["quantization"]
    assert card["class_agreement_with_fp32"] == res["class_agreement_with_fp32"]
    assert card["calibration"] == {"sources": [str(scene)], "tiles": 4, "tile_px": 64}
    assert res["source_model_sha256"] == file_sha256(tmp_path / "m.safetensors")
    # every convolution is quantized, biases included (the exporter's Constant -> Identity
    # biases are folded first; left alone, the quantizer skips those convolutions)
    import onnx

    g = onnx.load(str(tmp_path / "m8.onnx")).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(made_by.get(n.input[1]) == "DequantizeLinear" for n in convs)
    assert all(made_by.get(n.input[2]) == "DequantizeLinear" for n in convs if len(n.input) > 2)
    assert main(["info", str(tmp_path / "m8.onnx")]) == 0
    assert "quantization" in capsys.readouterr().out
    # an ONNX model cannot be quantized again
    with pytest.raises(ParameterError, match="already an ONNX model"):
        qz.quantize_model(tmp_path / "m8.onnx", tmp_path / "again.onnx", [scene], force=True)


def test_calibration_data_errors_name_the_file(tmp_path):
    fp32 = model_with(ConvBrightness(), tile_size=64, overlap=16)
    with pytest.raises(RasterReadError, match="missing.tif: calibration raster not found"):
        qz.quantize_model(fp32, tmp_path / "x.onnx", [tmp_path / "missing.tif"], force=True)
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    with pytest.raises(RasterReadError, match="empty.tif: no tile with valid pixels"):
        qz.quantize_model(fp32, tmp_path / "x.onnx", [empty], force=True)
    with pytest.raises(ParameterError, match="needs imagery"):
        qz.quantize_model(fp32, tmp_path / "x.onnx", [], force=True)
    assert not (tmp_path / "x.onnx").exists()
