"""The streamed segmentation pipeline on small rasters written by the tests."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from helpers import (
    BrightnessModel,
    ConstantModel,
    LocalModel,
    model_with,
    random_rgb,
    tiny_unet,
    write_raster,
)
from tessera.core.errors import (
    BandMismatchError,
    CancelledError,
    DeviceError,
    NoCRSError,
    OutputError,
    ParameterError,
    RasterNotFoundError,
    RasterReadError,
    TesseraError,
)
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline.band import RowBand
from tessera.core.pipeline.normalize import normalize
from tessera.core.pipeline.segment import segment_raster
from tessera.core.pipeline.stages import RowFeed
from tessera.core.pipeline.tiling import TileGrid

NOVEC = VectorizeParams(enabled=False)


def reference_probs(module, data, contract):
    """Whole-raster forward pass (no tiling): (K, H, W) probabilities."""
    valid = np.ones(data.shape[1:], bool)
    x = torch.from_numpy(normalize(data, valid, contract))[None]
    with torch.no_grad():
        return torch.softmax(module(x), dim=1)[0].numpy()


def read1(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile, ds


@pytest.mark.parametrize("h,w,tile,overlap", [(150, 230, 64, 16), (97, 64, 32, 8), (40, 130, 64, 16)])
def test_tiled_output_equals_whole_raster_forward_for_a_local_model(tmp_path, h, w, tile, overlap):
    """Seamless: with a receptive field (radius 2) inside the dropped margin, tiling is exact."""
    data = random_rgb(h, w, seed=h)
    src = write_raster(tmp_path / "in.tif", data)
    module = LocalModel(depth=2)
    m = model_with(module, tile_size=tile, overlap=overlap)
    res = segment_raster(src, m, tmp_path / "out",
                         SegmentParams(confidence=True, vectorize=NOVEC, batch_size=3))
    ref = reference_probs(module, data, m.contract)
    cls, prof, _ = read1(res.class_raster)
    assert cls.shape == (h, w)
    if h >= tile and w >= tile:  # no padding anywhere: exact equality
        np.testing.assert_array_equal(cls, ref.argmax(0).astype(np.uint8))
        conf, _, _ = read1(res.confidence_raster)
        expected = np.clip(np.rint(ref.max(0) * 255), 1, 255)
        assert np.abs(conf.astype(int) - expected).max() <= 1
    else:  # the short axis is padded (reflect) to the network's size: still nearly identical
        assert (cls == ref.argmax(0)).mean() > 0.97
    assert res.tiles == len(TileGrid(h, w, tile, overlap))


def test_hard_crop_would_differ_so_the_equality_test_can_fail(tmp_path):
    """Guard: without the dropped margin, tile-edge effects change pixels (the test has teeth)."""
    data = random_rgb(150, 230, seed=1)
    module = LocalModel(depth=2)
    m = model_with(module, tile_size=64, overlap=0)
    res = segment_raster(write_raster(tmp_path / "in.tif", data), m, tmp_path / "o",
                         SegmentParams(vectorize=NOVEC))
    ref = reference_probs(module, data, m.contract).argmax(0)
    cls, _, _ = read1(res.class_raster)
    assert (cls != ref).sum() > 0


def test_crs_transform_colours_names_and_window_are_preserved(tmp_path):
    data = random_rgb(120, 100)
    t = Affine(0.5, 0, 300000.0, 0, -0.5, 5000000.0)
    src = write_raster(tmp_path / "in.tif", data, crs="EPSG:32618", transform=t)
    m = model_with(ConstantModel(2))  # (0.5 m pixels, a 1 m model: at the raster's own)
    res = segment_raster(src, m, tmp_path / "o", SegmentParams(vectorize=NOVEC,
                                                                 resolution="native"))
    with rasterio.open(res.class_raster) as ds:
        assert ds.crs.to_epsg() == 32618
        assert ds.transform == t
        assert (ds.width, ds.height, ds.dtypes[0], ds.nodata) == (100, 120, "uint8", 255)
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate"
        # class ids are no smooth signal: no horizontal predictor (smaller and cheaper)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR", "1") == "1"
        assert ds.colormap(1)[2] == (0xE2, 0xA9, 0x29, 255)
        assert ds.colormap(1)[0] == (0x3C, 0x10, 0x98, 255)
        assert (ds.read(1) == 2).all()
    # GDAL itself (Debian's gdalinfo, in a clean environment) reads the category names from
    # the PAM sidecar: the same path QGIS takes.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "PROJ_"))}
    info = subprocess.run(["gdalinfo", "-json", res.class_raster], capture_output=True,
                          text=True, check=True, env=env)
    assert json.loads(info.stdout)["bands"][0]["categories"] == ["Building", "Land", "Water"]
    assert res.class_pixels == {"Building": 0, "Land": 0, "Water": 12000}
    # a window: same CRS, transform of the window's corner, the window's size
    res = segment_raster(src, m, tmp_path / "w", SegmentParams(vectorize=NOVEC,
                                                               window=(10, 20, 50, 70),
                                                               resolution="native"))
    with rasterio.open(res.class_raster) as ds:
        assert (ds.width, ds.height) == (50, 70)
        assert ds.transform == t * Affine.translation(10, 20)


def test_known_per_pixel_model_gives_exact_classes(tmp_path):
    """Dark pixels → class 0, bright → class 1, whatever the tiling."""
    h, w = 130, 170
    data = np.full((3, h, w), 200, np.uint8)
    data[:, :, :60] = 30
    data[:, 90:, 120:] = 10
    src = write_raster(tmp_path / "in.tif", data)
    m = model_with(BrightnessModel(), tile_size=64, overlap=16)
    res = segment_raster(src, m, tmp_path / "o", SegmentParams(vectorize=NOVEC))
    cls, _, _ = read1(res.class_raster)
    expected = np.ones((h, w), np.uint8)
    expected[:, :60] = 0
    expected[90:, 120:] = 0
    np.testing.assert_array_equal(cls, expected)


def test_nodata_stays_nodata_and_all_nodata_tiles_are_skipped(tmp_path):
    h, w = 200, 200
    data = random_rgb(h, w)
    data[:, :, :100] = 0  # left half is nodata: tiles fully inside are never inferred
    data[:, 150:160, 150:160] = 0
    src = write_raster(tmp_path / "in.tif", data, nodata=0)
    calls = []

    class Counting(LocalModel):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    m = model_with(Counting(), tile_size=64, overlap=16)
    # backend torch: the module's forward is what counts the tiles inferred
    res = segment_raster(src, m, tmp_path / "o", SegmentParams(confidence=True, vectorize=NOVEC,
                                                              backend="torch"))
    grid = TileGrid(h, w, 64, 16)
    expected_skipped = sum(1 for t in grid if t.col + t.width <= 100)
    assert expected_skipped > 0
    assert res.tiles_skipped == expected_skipped
    assert sum(calls) == len(grid) - expected_skipped
    cls, _, _ = read1(res.class_raster)
    conf, _, _ = read1(res.confidence_raster)
    invalid = np.all(data == 0, axis=0)
    assert (cls[invalid] == 255).all() and (conf[invalid] == 0).all()
    assert (cls[~invalid] < 3).all() and (conf[~invalid] > 0).all()
    assert sum(res.class_pixels.values()) == (~invalid).sum()


def test_nodata_override_and_alpha_band(tmp_path):
    data = random_rgb(80, 80)
    data[:, :20] = 7
    src = write_raster(tmp_path / "in.tif", data)  # no nodata in the file
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    res = segment_raster(src, m, tmp_path / "o", SegmentParams(vectorize=NOVEC, nodata=7))
    cls, _, _ = read1(res.class_raster)
    assert (cls[:20] == 255).all() and (cls[20:] == 1).all()
    # an RGBA raster: alpha 0 is nodata
    rgba = np.concatenate([random_rgb(80, 80), np.full((1, 80, 80), 255, np.uint8)])
    rgba[3, 40:, :] = 0
    src = write_raster(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    res = segment_raster(src, m, tmp_path / "o2", SegmentParams(vectorize=NOVEC))
    cls, _, _ = read1(res.class_raster)
    assert (cls[40:] == 255).all() and (cls[:40] == 1).all()


@pytest.mark.parametrize("dtype,scaling", [
    ("uint16", {"method": "minmax", "min": [0, 0, 0], "max": [10000, 10000, 10000]}),
    ("int16", {"method": "minmax", "min": [-1000, -1000, -1000], "max": [1000, 1000, 1000]}),
    ("float32", {"method": "none"}),
])
def test_other_dtypes_are_scaled_as_the_contract_says(tmp_path, dtype, scaling):
    rng = np.random.default_rng(0)
    data = rng.uniform(-900, 9000, size=(3, 70, 90)).astype(dtype)
    src = write_raster(tmp_path / "in.tif", data)
    module = LocalModel(depth=1)
    m = model_with(module, scaling=scaling, mean=None, std=None, tile_size=32, overlap=8)
    res = segment_raster(src, m, tmp_path / "o", SegmentParams(vectorize=NOVEC))
    cls, _, _ = read1(res.class_raster)
    ref = reference_probs(module, data, m.contract).argmax(0)
    np.testing.assert_array_equal(cls, ref)
    assert res.warnings == []


def test_band_selection_and_order(tmp_path):
    data = random_rgb(64, 64)
    four = np.concatenate([data, data[:1]])
    module = LocalModel(depth=1)
    m = model_with(module, tile_size=32, overlap=8)
    a = segment_raster(write_raster(tmp_path / "a.tif", data[::-1].copy()), m, tmp_path / "a",
                       SegmentParams(vectorize=NOVEC, bands=(3, 2, 1)))
    # (a 4-band byte GeoTIFF would get band 4 flagged as alpha by default; not here)
    b = segment_raster(write_raster(tmp_path / "b.tif", four, photometric="MINISBLACK"), m,
                       tmp_path / "b",
                       SegmentParams(vectorize=NOVEC))
    ca, _, _ = read1(a.class_raster)
    cb, _, _ = read1(b.class_raster)
    ref = reference_probs(module, data, m.contract).argmax(0)
    np.testing.assert_array_equal(ca, ref)
    np.testing.assert_array_equal(cb, ref)


def test_vrt_input(tmp_path):
    data = random_rgb(50, 60)
    write_raster(tmp_path / "base.tif", data)
    vrt = tmp_path / "v.vrt"
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename '
        f'relativeToVRT="1">base.tif</SourceFilename><SourceBand>{b}</SourceBand>'
        f"</SimpleSource></VRTRasterBand>" for b in (1, 2, 3))
    vrt.write_text(f'<VRTDataset rasterXSize="60" rasterYSize="50"><SRS>EPSG:32633</SRS>'
                   f"<GeoTransform>500000, 1, 0, 4000000, 0, -1</GeoTransform>{bands}</VRTDataset>")
    module = LocalModel(depth=1)
    m = model_with(module, tile_size=32, overlap=8)
    res = segment_raster(vrt, m, tmp_path / "o", SegmentParams(vectorize=NOVEC))
    cls, _, _ = read1(res.class_raster)
    np.testing.assert_array_equal(cls, reference_probs(module, data, m.contract).argmax(0))


def test_row_band_memory_does_not_depend_on_raster_height(tmp_path, monkeypatch):
    sizes = []
    orig = RowBand.__init__

    def spy(self, n_classes, grid, **kw):
        orig(self, n_classes, grid, **kw)
        sizes.append(self.nbytes)

    monkeypatch.setattr(RowBand, "__init__", spy)
    m = model_with(ConstantModel(0), tile_size=32, overlap=8)
    for h in (40, 1200):
        src = write_raster(tmp_path / f"h{h}.tif", random_rgb(h, 48))
        segment_raster(src, m, tmp_path / "o", SegmentParams(vectorize=NOVEC))
    # 3 float sums, the weight sum, validity, class and confidence bytes: 32 rows of 48
    assert len(sizes) == 2 and sizes[0] == sizes[1] == (3 * 4 + 4 + 1 + 2) * 32 * 48


def test_row_band_pop_shifts_rows():
    grid = TileGrid(6, 3, 4, 1)
    band = RowBand(2, grid)
    t = grid.tile_row(0)[0]
    probs = np.zeros((2, 4, 3), np.float32)
    probs[1] = 1.0
    band.add(t, probs, np.ones((4, 3), bool))
    top, cls, conf = band.pop(2, 255)
    assert top == 0 and (cls == 1).all() and (conf == 255).all()
    assert band.top == 2 and (band.wsum[:2] > 0).all() and band.wsum[2:].sum() == 0


def full_blend(grid, probs, valid, skipped):
    """The weighted blend summed over every tile's whole area, the plain way (reference)."""
    k = probs.shape[1]
    acc = np.zeros((k, grid.height, grid.width), np.float32)
    wsum = np.zeros((grid.height, grid.width), np.float32)
    for n, t in enumerate(grid):
        if n in skipped:
            continue
        w = grid.weights(t)
        acc[:, t.row:t.row + t.height, t.col:t.col + t.width] += probs[n][:, :t.height, :t.width] * w
        wsum[t.row:t.row + t.height, t.col:t.col + t.width] += w
    mx = acc.max(axis=0)
    ok = valid & (wsum > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.clip(np.rint(mx / wsum * np.float32(255.0)), 1, 255)
    return (np.where(ok, acc.argmax(axis=0), 255).astype(np.uint8),
            np.where(ok, conf, 0).astype(np.uint8))


def blend_through_band(band, grid, probs, valid, skipped):
    """Feed every tile to ``band`` row by row as the engine does; the classes and (if the band
    keeps them) confidence it pops, as whole rasters (99 where nothing was popped)."""
    cls = np.full((grid.height, grid.width), 99, np.uint8)
    conf = np.full((grid.height, grid.width), 99, np.uint8) if band.confidence else None
    n = 0
    for i in range(grid.shape[0]):
        for t in grid.tile_row(i):
            v = valid[t.row:t.row + t.height, t.col:t.col + t.width]
            band.add(t, None if n in skipped else probs[n][:, :t.height, :t.width].copy(), v)
            n += 1
        top, c, f = band.pop(grid.final_rows_after(i) - band.top, 255)
        cls[top:top + c.shape[0]] = c
        if conf is not None:
            conf[top:top + c.shape[0]] = f
        else:
            assert f is None
    return cls, conf


@pytest.mark.parametrize("h,w,tile,overlap", [(700, 530, 128, 32), (128, 300, 128, 16),
                                              (90, 100, 128, 8), (300, 260, 64, 30)])
def test_row_band_gives_the_full_blend_bit_for_bit(h, w, tile, overlap):
    """Blending only where tiles mix (class and confidence taken as they are elsewhere) gives
    exactly the weighted blend summed over the tiles' whole areas; with ties, nodata pixels
    and skipped tiles, and last tiles that are shorter or overlap by more."""
    grid = TileGrid(h, w, tile, overlap, 32)
    rng = np.random.default_rng(h + w)
    k = 4
    th, tw = min(tile, h), min(tile, w)
    logits = rng.integers(0, 3, (len(grid), k, th, tw)).astype(np.float32)  # many ties
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    valid = rng.random((h, w)) > 0.05
    skipped = {1} if len(grid) > 2 else set()
    for n, t in enumerate(grid):
        if n in skipped:
            valid[t.row:t.row + t.height, t.col:t.col + t.width] = False
    ref_cls, ref_conf = full_blend(grid, probs, valid, skipped)
    cls, conf = blend_through_band(RowBand(k, grid), grid, probs, valid, skipped)
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_array_equal(conf, ref_conf)
    assert (cls == 255).sum() == (~valid).sum() and (conf == 0).sum() == (~valid).sum()
    # without confidence: the same classes, no confidence computed or returned
    band = RowBand(k, grid, confidence=False)
    cls, conf = blend_through_band(band, grid, probs, valid, skipped)
    np.testing.assert_array_equal(cls, ref_cls)
    assert conf is None and not band.conf.any()


def _outputs(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cancel_leaves_nothing_under_the_final_names(tmp_path):
    src = write_raster(tmp_path / "in.tif", random_rgb(300, 300))
    m = model_with(LocalModel(), tile_size=32, overlap=8)
    out = tmp_path / "o"
    n = {"k": 0}

    def cancel():
        n["k"] += 1
        return n["k"] > 5

    with pytest.raises(CancelledError):
        segment_raster(src, m, out, SegmentParams(confidence=True), cancel=cancel)
    assert _outputs(out) == []


def test_a_failure_mid_run_leaves_previous_outputs_untouched(tmp_path):
    src = write_raster(tmp_path / "in.tif", random_rgb(200, 200))
    out = tmp_path / "o"
    ok = segment_raster(src, model_with(ConstantModel(1), tile_size=32, overlap=8), out,
                        SegmentParams(vectorize=NOVEC))
    before = Path(ok.class_raster).read_bytes()
    calls = {"n": 0}

    class Boom(ConstantModel):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("simulated failure in the model")
            return super().forward(x)

    with pytest.raises(RuntimeError, match="simulated"):
        segment_raster(src, model_with(Boom(2), tile_size=32, overlap=8), out,
                       SegmentParams(vectorize=NOVEC, backend="torch"))  # fails in forward
    assert Path(ok.class_raster).read_bytes() == before
    assert _outputs(out) == ["in_classes.tif", "in_classes.tif.aux.xml"]


def test_typed_errors_with_messages(tmp_path):
    m = tiny_unet()
    with pytest.raises(RasterNotFoundError, match="missing.tif: raster not found") as e:
        segment_raster(tmp_path / "missing.tif", m, tmp_path / "o")
    assert isinstance(e.value, FileNotFoundError)

    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(RasterReadError, match="corrupt.tif: GDAL cannot open it"):
        segment_raster(bad, m, tmp_path / "o")

    good = write_raster(tmp_path / "trunc.tif", random_rgb(256, 256), tiled=True,
                        blockxsize=64, blockysize=64, compress="deflate")
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RasterReadError, match="trunc.tif"):
        segment_raster(good, m, tmp_path / "o2", SegmentParams(vectorize=NOVEC))
    assert not (tmp_path / "o2" / "trunc_classes.tif").exists()

    two = write_raster(tmp_path / "two.tif", random_rgb(40, 40)[:2])
    with pytest.raises(BandMismatchError, match="expects 3 bands .* raster has 2"):
        segment_raster(two, m, tmp_path / "o")
    with pytest.raises(BandMismatchError, match="expects 3 bands, but 2 were selected"):
        segment_raster(two, m, tmp_path / "o", SegmentParams(bands=(1, 2)))

    nocrs = write_raster(tmp_path / "nocrs.tif", random_rgb(40, 40), crs=None)
    with pytest.raises(NoCRSError, match="no coordinate reference system"):
        segment_raster(nocrs, m, tmp_path / "o")
    # without polygons a raster without CRS is fine
    res = segment_raster(nocrs, m, tmp_path / "o", SegmentParams(vectorize=NOVEC))
    assert Path(res.class_raster).exists()

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        segment_raster(two, m, afile / "sub", SegmentParams(bands=(1, 2, 2), vectorize=NOVEC))

    with pytest.raises(ParameterError, match="beyond the raster"):
        segment_raster(two, m, tmp_path / "o", SegmentParams(bands=(1, 2, 2), window=(0, 0, 41, 5)))
    with pytest.raises(ParameterError, match="multiple of 32"):
        SegmentParams(tile_size=100)
    with pytest.raises(ParameterError, match="less than half"):
        SegmentParams(tile_size=64, overlap=32)
    with pytest.raises(ParameterError, match="device 'gpu'"):
        SegmentParams(device="gpu")
    for err in (RasterReadError, BandMismatchError, NoCRSError, OutputError, ParameterError):
        assert issubclass(err, TesseraError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path):
    src = write_raster(tmp_path / "in.tif", random_rgb(40, 40))
    with pytest.raises(DeviceError, match="CUDA is not available"):
        segment_raster(src, tiny_unet(), tmp_path / "o", SegmentParams(device="cuda"))


def test_auto_device_is_reported_and_progress_reaches_one(tmp_path):
    src = write_raster(tmp_path / "in.tif", random_rgb(100, 100))
    events = []
    res = segment_raster(src, tiny_unet(), tmp_path / "o", SegmentParams(), progress=events.append)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert res.device.startswith(expected)
    fr = [e.fraction for e in events]
    assert fr == sorted(fr) and fr[-1] == 1.0
    assert {"segment", "vectorize"} <= {e.stage for e in events}
    assert res.n_polygons is not None and res.n_polygons > 0
    assert Path(res.polygons).exists()


def test_pixel_size_warning(tmp_path):
    src = write_raster(tmp_path / "in.tif", random_rgb(40, 40),
                       transform=Affine(30.0, 0, 500000, 0, -30.0, 4000000))
    res = segment_raster(src, tiny_unet(), tmp_path / "o", SegmentParams(vectorize=NOVEC))
    assert any("pixel size is about 30 m" in w and "trained at 1 m" in w for w in res.warnings)
    # 16-bit values an 8-bit model cannot read are refused before the run: test_inputs.py


def test_overlap_zero_takes_each_pixel_from_the_one_tile_owning_it(tmp_path):
    """overlap 0: no float accumulators; the last tiles, shorter, split shared pixels midway."""
    from tessera.core.inference.factory import make_predictor

    h, w = 150, 230
    data = random_rgb(h, w, seed=7)
    module = LocalModel(depth=2)
    m = model_with(module, tile_size=64, overlap=0)
    pred = make_predictor(m, "cpu", "torch")
    shapes = []
    submit = pred.submit

    def spy(batch, **kw):
        shapes.append(batch.shape)
        return submit(batch, **kw)

    pred.submit = spy
    res = segment_raster(write_raster(tmp_path / "in.tif", data), m, tmp_path / "o",
                         SegmentParams(confidence=True, vectorize=NOVEC, batch_size=4),
                         predictor=pred)
    # a batch holds tiles of one shape: the three full tiles of a row, then the narrower last
    assert shapes == [(3, 3, 64, 64), (1, 3, 64, 40)] * 2 + [(3, 3, 32, 64), (1, 3, 32, 40)]
    grid = TileGrid(h, w, 64, 0, m.contract.size_multiple)
    # the last tiles are shorter: 32 rows (half a tile) and 40 columns (230 - 192, to 8s)
    assert grid.row_layout[-1] == (118, 32) and grid.col_layout[-1] == (190, 40)
    exp_cls = np.full((h, w), 99, np.uint8)
    exp_conf = np.zeros((h, w), np.uint8)
    for t in grid:
        p = reference_probs(module, data[:, t.row:t.row + t.height, t.col:t.col + t.width],
                            m.contract)
        r0, r1, c0, c1 = grid.owned(t)
        assert exp_cls[r0:r1, c0:c1].max() == 99  # owned by exactly one tile
        sl = (slice(r0 - t.row, r1 - t.row), slice(c0 - t.col, c1 - t.col))
        exp_cls[r0:r1, c0:c1] = p.argmax(0)[sl]
        exp_conf[r0:r1, c0:c1] = np.clip(np.rint(p.max(0) * 255), 1, 255)[sl]
    assert (exp_cls != 99).all()
    cls, _, _ = read1(res.class_raster)
    conf, _, _ = read1(res.confidence_raster)
    np.testing.assert_array_equal(cls, exp_cls)
    assert np.abs(conf.astype(int) - exp_conf).max() <= 1


def test_row_feed_hands_out_windows_and_keeps_only_the_rows_still_needed():
    import threading

    from tessera.core.errors import CancelledError

    src = (np.arange(40 * 3).reshape(40, 3) % 251).astype(np.uint8)
    feed = RowFeed(40, 3, max_rows=12)
    for top in (0, 8):  # two blocks of 8 rows
        feed.push(top, src[top:top + 8])
    win = rasterio.windows.Window
    # a window across both blocks (as a strip with a halo), then one further on
    assert np.array_equal(feed.read(1, win(0, 2, 3, 9)), src[2:11])
    assert feed._base == 0 and len(feed._rows) == 2  # row 2 still needs the first block
    assert np.array_equal(feed.read(1, win(0, 9, 3, 5)), src[9:14])
    assert feed._base == 8 and len(feed._rows) == 1  # the first block is dropped, not copied
    out = feed.read(1, win(0, 9, 3, 2))
    out[:] = 0  # a copy: the feed's rows are untouched
    assert np.array_equal(feed.read(1, win(0, 10, 3, 6)), src[10:16])
    # more than max_rows buffered: a push waits until a read moves past the rows
    feed.push(16, src[16:24])  # 16 rows buffered from row 8 (> 12)
    pushed = threading.Event()
    t = threading.Thread(target=lambda: (feed.push(24, src[24:40]), pushed.set()))
    t.start()
    assert not pushed.wait(0.3)
    assert np.array_equal(feed.read(1, win(0, 20, 3, 4)), src[20:24])
    assert pushed.wait(5)
    t.join()
    assert np.array_equal(feed.read(1, win(0, 22, 3, 18)), src[22:40])
    # a read that waits for rows never pushed ends when the feed is aborted
    feed2 = RowFeed(40, 3, max_rows=12)
    threading.Timer(0.2, feed2.abort).start()
    with pytest.raises(CancelledError, match="polygonizing stopped"):
        feed2.read(1, win(0, 0, 3, 4))


@pytest.mark.parametrize(("nodata", "dtype", "message"), [
    (300, "uint8", r"nodata 300 cannot occur in the raster's uint8 bands \(whole numbers 0\.\.255\)"),
    (-1, "uint8", r"nodata -1 cannot occur in the raster's uint8 bands"),
    (2.5, "uint16", r"nodata 2\.5 cannot occur in the raster's uint16 bands \(whole numbers 0\.\.65535\)"),
    (float("nan"), "int16", r"nodata nan cannot occur in the raster's int16 bands"),
    (float("inf"), "uint8", r"nodata inf cannot occur"),
    (1e39, "float32", r"nodata 1e\+39 is beyond the range of the raster's float32 bands"),
])
def test_a_nodata_the_bands_cannot_hold_is_refused_before_the_run(tmp_path, nodata, dtype,
                                                                  message):
    """Out of the bands' range a nodata value would wrap (300 on uint8 masked every pixel of
    value 44): it is refused with the file and the range, before any output exists."""
    data = (random_rgb(40, 40) // 2).astype(dtype)
    data[:, :5, :5] = 0
    src = write_raster(tmp_path / "r.tif", data)
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    with pytest.raises(ParameterError, match=message) as e:
        segment_raster(src, m, tmp_path / "o", SegmentParams(
            nodata=nodata, vectorize=VectorizeParams(enabled=False)))
    assert str(src) in str(e.value)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    # a value the bands can hold is used as it is
    res = segment_raster(src, m, tmp_path / "ok", SegmentParams(
        nodata=0, vectorize=VectorizeParams(enabled=False)))
    with rasterio.open(res.class_raster) as ds:
        cls = ds.read(1)
    valid = ~np.all(data == 0, axis=0)
    assert not valid[:5, :5].any() and valid.sum() > 1000
    assert (cls[valid] == 1).all() and (cls[~valid] == m.contract.nodata_value).all()


def test_gdal_keeps_to_one_thread_beside_a_model_on_every_cpu(tmp_path):
    """GDAL's own (de)compression threads would take the cores of a model on the CPU:
    a run with the model on every CPU opens its GeoTIFFs with one; with fewer model threads
    than CPUs (or a GPU possible) GDAL keeps them all."""
    from rasterio.env import getenv, hasenv
    from tessera.core.inference.factory import model_on_cpu
    from tessera.core.params import cpu_count

    src = write_raster(tmp_path / "in.tif", random_rgb(96, 96))
    m = model_with(LocalModel(), tile_size=32, overlap=0)
    seen = []

    def note(_):  # (the last progress comes once the run's GDAL settings are gone)
        if hasenv():
            seen.append(getenv().get("GDAL_NUM_THREADS"))

    res = segment_raster(src, m, tmp_path / "o", SegmentParams(device="cpu", backend="torch"),
                         progress=note)
    assert set(seen) == {"1"} and res.n_polygons > 0
    assert model_on_cpu(m, SegmentParams(backend="onnxruntime"))
    if cpu_count() > 1:
        seen.clear()
        segment_raster(src, m, tmp_path / "p", SegmentParams(device="cpu", threads=1),
                       progress=note)
        assert set(seen) == {"ALL_CPUS"}
        assert not model_on_cpu(m, SegmentParams(device="cpu", threads=1))

    class OnGpu:
        class info:  # noqa: N801  (a predictor's DeviceInfo, as a GPU's reads)
            kind = "cuda"

    assert not model_on_cpu(m, SegmentParams(device="cpu"), OnGpu())


def test_a_predictor_begun_early_reports_its_errors_after_the_inputs(tmp_path):
    """predictor_soon: a run that can only be on the CPU has its predictor made on a thread
    while the raster is checked (a process's start); a bad raster is still the error given
    (not the model's), a model's error comes before any output, and a run that may be on a
    GPU makes its predictor when it needs it."""
    from concurrent.futures import Future

    from tessera.core.inference.factory import model_on_cpu, predictor_soon, ready_predictor

    src = write_raster(tmp_path / "in.tif", random_rgb(96, 96))
    m = model_with(LocalModel(), tile_size=32, overlap=0)
    on_cpu = SegmentParams(device="cpu", backend="torch")
    soon = predictor_soon(m, on_cpu)
    assert isinstance(soon, Future)
    early = segment_raster(src, m, tmp_path / "a", on_cpu, predictor=soon)
    assert soon.result().info.kind == "cpu" and ready_predictor(soon, m, on_cpu) is soon.result()
    late = segment_raster(src, m, tmp_path / "b", on_cpu)
    assert np.array_equal(read1(early.class_raster)[0], read1(late.class_raster)[0])
    assert predictor_soon(m, SegmentParams(device="cuda")) is None
    # (GDAL's threads for a run given the future: decided by the parameters, as without)
    assert model_on_cpu(m, on_cpu, soon) is True
    assert model_on_cpu(m, SegmentParams(device="cuda"), Future()) is False

    failing: Future = Future()
    failing.set_exception(DeviceError("this model cannot be loaded"))
    with pytest.raises(RasterNotFoundError, match="missing.tif"):
        segment_raster(tmp_path / "missing.tif", m, tmp_path / "c", on_cpu, predictor=failing)
    with pytest.raises(DeviceError, match="cannot be loaded"):
        segment_raster(src, m, tmp_path / "d", on_cpu, predictor=failing)
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())
