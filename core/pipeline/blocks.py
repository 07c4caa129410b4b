"""One large raster across Dask workers (``tessera segment BIG.tif --cluster ...``).

The raster's tile grid (the same as on one machine) is cut into blocks of whole tile rows.
A worker runs block ``[a, b)`` — tile rows ``a`` to ``b - 1`` and, before them, tile row
``a - 1``, whose tiles reach into row ``a``'s pixels — through the same blend, in the same
order, so its rows are the single-machine run's bit for bit; it writes the class rows (and the
confidence rows) from the top of tile row ``a`` down to where tile row ``b`` begins as a part
file, and traces that part's polygons with the single-machine run's strips
(:mod:`..vectorize.seams`: complete ones into the block's GeoPackage, the pieces at its seams
aside), all committed whole. The client assembles the parts into one Cloud-Optimized GeoTIFF
(tiled, deflate, overviews), copies the blocks' polygons into the run's sink as they come,
joining the regions that cross block seams, and commits the outputs together. (With a sieve,
whose halo would need the next block's rows, the client traces the polygons from the parts
instead.) Parts already there from an interrupted run of the same settings are not computed
again. Memory per worker is one block's rolling band, as on one machine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from ..errors import CancelledError, ClusterError
from ..io.atomic import atomic_outputs, private_dir
from ..io.jsonsafe import read_limited
from ..io.raster import gdal_env
from ..io.sinks import verify_geotiff, write_failed
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams, VectorizeParams
from ..progress import CancelFn, Progress, ProgressFn
from .manifest import run_record

log = logging.getLogger(__name__)

#: Tile rows per block when the cluster's size is not known (a block also computes the
#: tile row above it: 1/8 more work).
BLOCK_TILE_ROWS = 8
#: Most tile rows in one block when they are sized to the cluster (a block killed with its
#: worker is computed again whole: smaller blocks lose less).
MAX_BLOCK_TILE_ROWS = 32
#: Rows copied at a time when the parts are assembled.
COPY_ROWS = 1024


@dataclass(frozen=True)
class Block:
    """Tile rows ``[a, b)`` of the grid, giving output rows ``[row0, row1)``."""

    a: int
    b: int
    row0: int
    row1: int

    def part(self, folder: Path, kind: str) -> Path:
        """The part file of ``kind``: ``classes``, ``confidence``, ``polygons`` (complete
        ones), ``seams`` (the pieces at its seams), ``done`` (its record)."""
        return folder / f"{kind}-{self.a:06d}-{self.b:06d}.{PART_EXT.get(kind, 'tif')}"


#: The file type of each part that is not a GeoTIFF.
PART_EXT = {"done": "json", "polygons": "gpkg", "seams": "npz"}


def traced_on_workers(vec: VectorizeParams | None) -> TypeGuard[VectorizeParams]:
    """Whether a block run's polygons (``vec``: ``None`` for none) are traced on the workers
    (not with a sieve: its halo would need the next block's rows)."""
    return vec is not None and vec.sieve_px <= 0


def _part_kinds(params: SegmentParams) -> list[str]:
    """The parts a block writes, its record (``done``) aside."""
    vec = params.vectorize if params.vectorize.enabled else None
    return (["classes"] + (["confidence"] if params.confidence else [])
            + (["polygons", "seams"] if traced_on_workers(vec) else []))


def plan_blocks(grid: Any, tile_rows: int = BLOCK_TILE_ROWS) -> list[Block]:
    """The blocks of ``grid`` (a :class:`~.tiling.TileGrid`), ``tile_rows`` tile rows each."""
    n = grid.shape[0]
    cuts = list(range(0, n, max(1, tile_rows))) + [n]
    return [Block(a, b, grid.row_offsets[a] if a else 0, grid.final_rows_after(b - 1))
            for a, b in itertools.pairwise(cuts)]


def block_tile_rows(n_rows: int, slots: int) -> int:
    """Tile rows per block for a grid of ``n_rows`` tile rows on ``slots`` worker threads.

    Each block but the first also computes the tile row above it, so the fewer blocks the
    less work: one per slot, of equal size (the first, without the extra row, may take one
    more) — all slots busy to the end, the extra work ``(slots - 1) / n_rows``. A multiple of
    the slots only when a block would exceed :data:`MAX_BLOCK_TILE_ROWS`.
    Unknown (``slots`` 0): :data:`BLOCK_TILE_ROWS`."""
    if slots <= 0:
        return BLOCK_TILE_ROWS
    per = -(-n_rows // slots)
    if per > MAX_BLOCK_TILE_ROWS:
        per = -(-n_rows // (slots * -(-per // MAX_BLOCK_TILE_ROWS)))
    return max(1, per)


def _slots(client: Any) -> int:
    """Worker threads the cluster has now (0 when none has joined yet)."""
    try:
        return sum(int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values())
    except Exception:  # noqa: BLE001  (an old scheduler: sized by the default)
        return 0


def parts_folder(out_dir: Path, stem: str, record: dict[str, Any]) -> Path:
    """Where a run's parts go: hidden, beside the outputs, named after the run's record (a
    run of other settings never takes another's parts)."""
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return Path(out_dir) / f".{stem}.tessera-blocks-{key}"


def segment_block(raster: str, model: TesseraModel, params: SegmentParams, outs: OutputPaths,
                  block: Block, folder: Path, predictor: Any) -> dict[str, Any]:
    """Run ``block`` of ``raster`` (on a worker) into its part files; return its class
    histogram and skipped tiles. A block whose parts are there already is not run again."""
    from affine import Affine

    from ..io.sinks import verify_geopackage
    from ..vectorize.seams import BLOCK_LAYER, trace_block
    from .inputs import opened
    from .run import Run
    from .segment import _open_sinks, _plan

    kinds, done = _part_kinds(params), block.part(folder, "done")
    if done.exists() and all(block.part(folder, k).exists() for k in kinds):
        try:  # a record that is not one of ours (damaged, crafted): the block is run again
            rec = read_limited(done, "a block's record", 1 << 24)
            if isinstance(rec, dict) and isinstance(rec.get("hist"), list):
                return rec
        except (OSError, ValueError):
            pass
    private_dir(folder, mine=False)
    contract = model.contract
    with gdal_env(), opened(raster, contract, params) as (ds, notes, count, label):
        plan = _plan(ds, label, contract, params, outs, notes, count)
        profile = dict(plan.profile, height=block.row1 - block.row0,
                       transform=plan.profile["transform"] * Affine.translation(0, block.row0))
        with atomic_outputs(*[block.part(folder, k) for k in kinds], done) as temps:
            sinks = _open_sinks(replace(plan, profile=profile), temps)
            try:
                stats = Run(plan.view.reader(ds, plan.bands, plan.window, plan.nodata),
                            plan.grid, contract, predictor, params.batch_size, sinks, None,
                            lambda *_: None, None, None, plan.path,
                            block=(block.a, block.b)).run()
            finally:
                for sink in sinks:
                    sink.close()
            verify_geotiff(temps[0], block.part(folder, "classes"), stats["hist"])
            out = {"hist": stats["hist"].tolist(), "skipped": stats["skipped"],
                   "seconds": round(stats["seconds_segment"], 3)}
            if traced_on_workers(plan.vec):
                t0 = time.perf_counter()
                k = kinds.index("polygons")
                out["polygons"], out["seam_pieces"], out["guard_cuts"] = trace_block(
                    temps[0], (block.row0, block.row1), plan.grid.height, temps[k],
                    temps[k + 1], plan.vec, contract.class_names, contract.nodata_value,
                    plan.profile["transform"], plan.profile["crs"], _breaks(plan.grid),
                    final=block.part(folder, "polygons"))
                verify_geopackage(temps[k], block.part(folder, "polygons"), BLOCK_LAYER,
                                  out["polygons"])
                out["seconds_vectorize"] = round(time.perf_counter() - t0, 3)
            temps[-1].write_text(json.dumps(out), encoding="utf-8")
    return out


class PartRows:
    """The class rows of a block run, read from its parts as they are finished (in any
    order): what the polygonizer reads while the other blocks are still running. ``read``
    waits for the parts it needs; :meth:`abort` makes every wait raise."""

    def __init__(self, blocks: list[Block], folder: Path, width: int, height: int,
                 name: str) -> None:
        self.blocks, self.folder = blocks, folder
        self.width, self.height, self.name = width, height, name
        self._ready = {b.a: threading.Event() for b in blocks}
        self._open: dict[int, Any] = {}
        self._aborted = False

    def done(self, block: Block) -> None:
        """``block``'s part is complete."""
        self._ready[block.a].set()

    def wait(self, block: Block) -> None:
        """Until ``block``'s part is complete (:class:`CancelledError` after :meth:`abort`)."""
        self._ready[block.a].wait()
        if self._aborted:
            raise CancelledError("cancelled")

    def abort(self) -> None:
        """Stop: every read raises :class:`CancelledError`."""
        self._aborted = True
        for ev in self._ready.values():
            ev.set()

    def read(self, band: int, window: Any) -> np.ndarray:
        """Rows ``window.row_off`` … of band 1 (all columns), once their parts exist."""
        import rasterio
        from rasterio.windows import Window

        r0, r1 = int(window.row_off), int(window.row_off + window.height)
        out = []
        for blk in self.blocks:
            lo, hi = max(r0, blk.row0), min(r1, blk.row1)
            if lo >= hi:
                continue
            self.wait(blk)
            if blk.a not in self._open:
                self._open[blk.a] = rasterio.open(blk.part(self.folder, "classes"))
            out.append(self._open[blk.a].read(band, window=Window(0, lo - blk.row0,
                                                                   self.width, hi - lo)))
        return np.concatenate(out, axis=0)

    def close(self) -> None:
        """Close the parts opened."""
        for ds in self._open.values():
            ds.close()
        self._open.clear()


class PolygonTracer(threading.Thread):
    """Traces the polygons from :class:`PartRows` beside the running blocks."""

    def __init__(self, plan: Any, rows: PartRows, tmp: Path, final: Path,
                 cancel: CancelFn | None, sink: Any = None) -> None:
        super().__init__(name="tessera-block-polygons", daemon=True)
        self.plan, self.rows, self.tmp, self.final, self.cancel = plan, rows, tmp, final, cancel
        self.sink = sink  # a database's layer, or None: the GeoPackage ``tmp``
        self.result: Any = None
        self.cuts: list[int] = []  # rows where the client's memory guard cut a region
        self.error: BaseException | None = None

    def run(self) -> None:
        """Trace (an error is kept for the client's thread)."""
        from ..vectorize.writer import write_polygons

        plan = self.plan
        try:
            with gdal_env():
                self.result = write_polygons(
                    self.rows, self.tmp, plan.outs.polygons.stem, plan.vec,
                    plan.contract.class_names, plan.contract.nodata_value,
                    plan.profile["transform"], plan.profile["crs"], self.cancel,
                    breaks=_breaks(plan.grid), final=self.final, sink=self.sink)
        except BaseException as exc:  # noqa: BLE001  (handed to the client's thread)
            self.error = exc
        finally:
            self.rows.close()


class SeamJoiner(PolygonTracer):
    """Copies the polygons the workers traced into the run's sink, block by block as their
    parts are finished, joining the regions that cross block seams
    (:class:`~..vectorize.seams.SeamMerge`)."""

    def run(self) -> None:
        """Join (an error is kept for the client's thread)."""
        from ..io.sinks import polygon_sink
        from ..progress import check_cancel
        from ..vectorize.seams import SeamMerge
        from ..vectorize.writer import PolygonWriter, write_errors

        plan, rows = self.plan, self.rows
        try:
            with gdal_env(), write_errors(self.final):
                sink = self.sink or polygon_sink(self.tmp, plan.outs.polygons.stem,
                                                 plan.profile["crs"].to_wkt())
                merge = SeamMerge(rows.width, rows.height, PolygonWriter(
                    sink, plan.vec, plan.contract.class_names, plan.profile["transform"],
                    plan.profile["crs"]))
                self.cuts = merge.regions.cuts
                for blk in rows.blocks:
                    rows.wait(blk)
                    check_cancel(self.cancel)
                    merge.add_block((blk.row0, blk.row1), blk.part(rows.folder, "polygons"),
                                    blk.part(rows.folder, "seams"))
                self.result = merge.finish()
        except BaseException as exc:  # noqa: BLE001  (handed to the client's thread)
            self.error = exc


def _breaks(grid: Any) -> tuple[int, ...]:
    """The rows where the single-machine run's polygon strips end (its tile rows' ends)."""
    return tuple(grid.final_rows_after(i) for i in range(grid.shape[0]))


def _copy_parts(blocks: list[Block], folder: Path, kind: str, sink: Any) -> None:
    import rasterio
    from rasterio.windows import Window

    for blk in blocks:
        with rasterio.open(blk.part(folder, kind)) as part:
            for r in range(0, part.height, COPY_ROWS):
                h = min(COPY_ROWS, part.height - r)
                sink.write_rows(blk.row0 + r, part.read(1, window=Window(0, r, part.width, h)))


def _to_cog(src: Path, dst: Path, final: Path) -> None:
    """``src`` (a tiled GeoTIFF) as a Cloud-Optimized GeoTIFF ``dst``: deflate, 512² blocks,
    nearest-neighbour overviews (class ids are never averaged); colours and tags kept."""
    import rasterio.shutil

    try:
        rasterio.shutil.copy(src, dst, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512,
                             OVERVIEW_RESAMPLING="NEAREST")
    except Exception as exc:
        raise write_failed(final, exc) from exc


def assemble(plan: Any, blocks: list[Block], folder: Path, temps: list[Path],
             hist: np.ndarray, tracer: PolygonTracer | None,
             cancel: CancelFn | None = None) -> dict[str, Any]:
    """The outputs of a block run from its parts (see the module's notes) into the run's
    temporaries ``temps``; returns the polygons' ``(count, m² per class id)`` when traced
    (by ``tracer``, which has been reading the parts as they came)."""
    from ..io.sinks import verify_geopackage
    from .segment import _add_confidence, _open_sinks, _verify_rows

    finals = plan.finals
    out: dict[str, Any] = {}
    flat = [folder / f"assembled-{k}.tif" for k in range(1 + int(plan.confidence))]
    sinks = _open_sinks(plan, flat)
    try:
        _copy_parts(blocks, folder, "classes", sinks[0])
        if plan.confidence:
            _copy_parts(blocks, folder, "confidence", sinks[1])
    finally:
        for sink in sinks:
            sink.close()
    for k, path in enumerate(flat):
        _to_cog(path, temps[k], finals[k])
    verify_geotiff(temps[0], finals[0], hist)
    if tracer is not None:
        while tracer.is_alive():
            tracer.join(timeout=0.2)
            if cancel is not None and cancel():
                tracer.rows.abort()
        if tracer.error is not None:
            raise tracer.error
        out["polygons"] = tracer.result
        _add_confidence(plan, temps, tracer.sink, cancel)
        if tracer.sink is not None:  # rows in a database
            _verify_rows(tracer.sink, out["polygons"][0])
            return out
        k = plan.polygons_temp_index
        verify_geopackage(temps[k], finals[k], plan.outs.polygons.stem, out["polygons"][0])
    return out


def segment_on_cluster(raster: str | Path, model: str | Path, out_dir: str | Path,
                       params: SegmentParams, address: str, *, stem: str | None = None,
                       outputs: OutputPaths | None = None, progress: ProgressFn | None = None,
                       cancel: CancelFn | None = None,
                       tile_rows: int | None = None, head: int | None = None) -> Any:
    """Segment one raster with its blocks on the Dask cluster at ``address`` (see the
    module's notes); the outputs and the result as :func:`~.segment.segment_raster`'s.
    ``tile_rows``: tile rows per block (default: sized to the cluster, :func:`block_tile_rows`);
    ``head``: that head of a multi-head model (:func:`.heads.segment_heads`)."""
    from ..model.heads import head_view
    from .cluster import (
        PLUGIN,
        ModelOnWorker,
        _distributed,
        absolute,
        absolute_outputs,
        clean_up,
        connect,
    )
    from .inputs import default_stem, opened
    from .segment import _database, _plan

    t0, path = time.perf_counter(), absolute(raster)  # the workers' folder is not ours
    m = TesseraModel.open(absolute(model))
    m = m if head is None else head_view(m, head)
    outs = absolute_outputs(outputs or OutputPaths.for_stem(out_dir, stem or default_stem(path)))
    with gdal_env(), opened(path, m.contract, params) as (ds, notes, count, label):
        plan = _plan(ds, label, m.contract, params, outs, notes, count)
    folder = parts_folder(outs.class_raster.parent, outs.class_raster.stem, run_record(path, m, params))
    distributed = _distributed()
    client, cluster = connect(address)
    blocks = plan_blocks(plan.grid, tile_rows or block_tile_rows(plan.grid.shape[0],
                                                                 _slots(client)))
    stats: list[dict[str, Any]] = []
    private_dir(folder)
    try:
        with atomic_outputs(*plan.finals) as temps, _database(plan) as db:
            rows = PartRows(blocks, folder, plan.grid.width, plan.grid.height, plan.path)
            tracer = _tracer(plan, rows, temps, db, cancel)
            try:
                client.register_plugin(ModelOnWorker(str(m.path), m.identity(), params, head),
                                       name=PLUGIN)
                futures = {client.submit(_block_on_worker, path, params, outs, blk, folder,
                                         pure=False, retries=2,
                                         key=f"tessera-block-{folder.name}-{blk.a}"): blk
                           for blk in blocks}
                try:
                    _collect(distributed, futures, client, rows, stats, plan.path, t0, progress,
                             cancel, address)
                finally:
                    clean_up(client, [folder, outs.class_raster.parent])
                hist = np.sum([np.asarray(s["hist"], np.int64) for s in stats], axis=0)
                vec = assemble(plan, blocks, folder, temps, hist, tracer, cancel)
            except BaseException:
                rows.abort()
                if tracer is not None:
                    tracer.join(timeout=60)  # before its temporary goes
                raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    shutil.rmtree(folder, ignore_errors=True)
    _say_cuts(plan, plan.path, sum(s.get("guard_cuts", 0) for s in stats)
              + len(getattr(tracer, "cuts", ())))
    return _result(plan, m, params, outs, address, stats, hist, vec, plan.path, t0)


def _say_cuts(plan: Any, path: str, cuts: int) -> None:
    """One warning for the memory guard's cuts on the workers and the client."""
    if cuts and plan.vec is not None:
        log.warning("%s: the memory guard cut %d large regions open at strip seams (at most "
                    "%d vertices open at once; see max_region_vertices): each is more than "
                    "one polygon", path, cuts, plan.vec.max_region_vertices)


def _result(plan: Any, m: TesseraModel, params: SegmentParams, outs: OutputPaths,
            address: str, stats: list[dict[str, Any]], hist: np.ndarray,
            vec: dict[str, Any], path: str, t0: float) -> Any:
    """The :class:`~.segment.SegmentResult` of a block run."""
    from ..io.postgis import redact
    from .segment import SegmentResult

    c = m.contract
    res = SegmentResult(
        source=path, class_raster=str(outs.class_raster),
        confidence_raster=str(outs.confidence_raster) if plan.confidence else None,
        polygons=(redact(outs.polygons_db) if outs.polygons_db else str(outs.polygons))
        if plan.vec is not None else None,
        n_polygons=vec["polygons"][0] if plan.vec is not None else None,
        device=f"Dask cluster {address}", seconds=round(time.perf_counter() - t0, 3),
        seconds_segment=round(max(s["seconds"] for s in stats), 3),
        seconds_vectorize=round(max(s.get("seconds_vectorize", 0.0) for s in stats), 3),
        megapixels=plan.grid.width * plan.grid.height / 1e6, tiles=len(plan.grid),
        tiles_skipped=sum(s["skipped"] for s in stats), tile_size=plan.grid.tile,
        overlap=plan.grid.overlap, batch_size=params.batch_size,
        class_pixels={k.name: int(hist[k.id]) for k in c.classes}, warnings=plan.warnings)
    if plan.vec is not None:
        res.area_m2_by_class = {c.class_names.get(k, str(k)): round(v, 3)
                                for k, v in sorted(vec["polygons"][1].items())}
    return res


def _tracer(plan: Any, rows: PartRows, temps: list[Path], db: Any,
            cancel: CancelFn | None) -> PolygonTracer | None:
    """The polygon tracer of a block run, started (into the database's layer, or the
    GeoPackage's temporary); ``None`` without polygons."""
    if plan.vec is None:
        return None
    kind = SeamJoiner if traced_on_workers(plan.vec) else PolygonTracer
    if db is not None:
        tracer = kind(plan, rows, plan.outs.polygons, plan.outs.polygons, cancel, db)
    else:
        k = plan.polygons_temp_index
        tracer = kind(plan, rows, temps[k], plan.finals[k], cancel)
    tracer.start()
    return tracer


def _collect(distributed: Any, futures: dict[Any, Block], client: Any, rows: PartRows,
             stats: list[dict[str, Any]], path: str, t0: float, progress: ProgressFn | None,
             cancel: CancelFn | None, address: str) -> None:
    """The blocks' results as they finish, with progress; each finished part goes to the
    polygon tracer at once; a cancel stops the rest."""
    from .cluster import lost

    n = len(futures)
    for k, fut in enumerate(distributed.as_completed(list(futures)), 1):
        if cancel is not None and cancel():
            client.cancel(list(futures))
            raise CancelledError("cancelled; the blocks finished are kept for a rerun")
        try:
            stats.append(fut.result())
        except distributed.KilledWorker as exc:
            raise ClusterError(f"{path}: workers died running {exc.task} (out of "
                               "memory?)") from exc
        except Exception as exc:
            err = lost(exc, address, f"{path} ran")
            if err is None:
                raise
            raise err from exc
        rows.done(futures[fut])
        if progress is not None:
            progress(Progress("segment", k, n, 0.9 * k / n, time.perf_counter() - t0, None,
                              None, f"{k}/{n} blocks on the cluster"))


def _block_on_worker(raster: str, params: SegmentParams, outs: OutputPaths, block: Block,
                     folder: Path) -> dict[str, Any]:
    from distributed import get_worker

    from .cluster import PLUGIN, ModelOnWorker

    plugin: ModelOnWorker = get_worker().plugins[PLUGIN]  # type: ignore[assignment]
    return segment_block(raster, plugin.model(), params, outs, block, folder, plugin.predictor())
