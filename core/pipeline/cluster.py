"""Batches on a Dask cluster: the same plan, files and report as on one machine, the files run
by Dask workers (``--cluster tcp://HOST:8786`` for a running scheduler, ``local:N`` for N
worker processes here).

Every worker must see the input folder, the output folder and the model file under the same
paths (shared storage). The model is loaded once per worker (a worker plugin, lazily, at its
first file), never once per file; its SHA-256 must be the one the client planned with, so a
worker that sees another file under the same path is refused. A file is one task: its outputs
are committed whole or not at all by the worker (the same write path as on one machine), so a
worker killed mid-file leaves nothing under the final names and Dask runs the file again on
another worker; the lock and the manifest keep a file from being done twice by two runs.
Dask is optional at run time: without it ``--cluster`` says how to install it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CancelledError, ClusterError, ModelError, ParameterError
from ..inference.factory import params_predictor
from ..io.websource import is_web_source
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams, local_workers
from ..progress import CancelFn, ProgressFn
from .batch import BatchPlan, BatchStopped, FileReport, FileTask, run_one

try:  # Dask is optional: without it the plugin is a plain class and connect() says why
    from distributed import WorkerPlugin as _PluginBase
except ImportError:  # pragma: no cover
    _PluginBase = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

#: Seconds to wait for a scheduler to answer before saying it does not.
CONNECT_TIMEOUT = 10.0
#: Times a file is retried after an error raised on a worker (a worker that dies is handled
#: by the scheduler: its files go to other workers, up to Dask's ``allowed-failures``).
RETRIES = 2
PLUGIN = "tessera-model"

INSTALL_HINT = ("install it into the engine environment: pip install 'dask[distributed]' "
                "(the version pinned in requirements.txt)")


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(f"--cluster needs Dask, which is not installed; {INSTALL_HINT}") from exc
    return distributed


def connect(address: str, timeout: float = CONNECT_TIMEOUT) -> tuple[Any, Any]:
    """``(client, cluster)``: a client of the scheduler at ``address`` (``cluster`` ``None``),
    or of a new ``LocalCluster`` of N single-threaded worker processes for ``local:N``.
    Raises :class:`ClusterError` at once when the scheduler does not answer.

    A local cluster is secured: its scheduler, workers and client speak TLS with temporary
    credentials made for it alone (Dask's ``Security.temporary()``), on 127.0.0.1 only and
    without a dashboard (its HTTP server serves only a health check), so no other local user
    can connect to it and run code with the batch's rights. A scheduler of ``address`` is
    reached with the TLS settings of Dask's own configuration (``distributed.comm.tls.*``:
    see README, *Scaling out*)."""
    n = local_workers(address)
    distributed = _distributed()
    _quiet_dask()
    if n is not None:
        try:
            security = distributed.security.Security.temporary()
        except ImportError as exc:
            raise ClusterError("--cluster local:N secures its cluster with TLS, which needs the "
                               "cryptography package; install it into the engine environment: "
                               "pip install cryptography") from exc
        import dask

        # its HTTP server answers only "healthy?", on a free port of the loopback
        with dask.config.set({"distributed.scheduler.http.routes": ["distributed.http.health"]}):
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                security=security, silence_logs=logging.WARNING)
        return distributed.Client(cluster, security=security), cluster
    try:
        return distributed.Client(address, timeout=timeout), None
    except (TypeError, ValueError) as exc:  # Dask's words for "TLS without credentials"
        raise ClusterError(f"{address}: a TLS scheduler needs this client's certificate: set "
                           "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ..._TLS__CLIENT__CERT and "
                           "..._TLS__CLIENT__KEY (or distributed.comm.tls in Dask's "
                           f"configuration; see README, Scaling out) ({exc})") from exc
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"{address}: no Dask scheduler answers there within {timeout:g} s "
                           f"({exc}); start one with `dask scheduler`, or check the address "
                           "and the firewall") from exc


def _quiet_dask() -> None:
    """Dask's own log lines (a local scheduler's start, each worker and client, a lost
    connection's tracebacks) only with ``--verbose`` (this program's level INFO or lower):
    otherwise Tessera's own messages say what happened, in one line."""
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    names = [n for n in list(logging.root.manager.loggerDict)  # (Dask sets some levels itself)
             if n.split(".")[0] in ("distributed", "dask", "tornado")]
    for name in {"distributed", "dask", *names}:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)


def lost(exc: BaseException, address: str, what: str) -> ClusterError | None:
    """The one-line :class:`ClusterError` for ``exc`` when it means the scheduler (or the
    connection to it) was lost while ``what`` ran; ``None`` for any other error."""
    import concurrent.futures

    if isinstance(exc, (concurrent.futures.CancelledError, OSError, TimeoutError)):
        detail = (str(exc).strip().splitlines() or ["no detail"])[0][:200]
        return ClusterError(f"{address}: the connection to the Dask scheduler was lost while "
                            f"{what} ({type(exc).__name__}: {detail}); what was finished is "
                            "kept: run the same command again to go on")
    return None


def absolute(path: str | Path) -> str:
    """``path`` as the workers must see it: absolute (a worker's working folder is not the
    client's). A name that is no local path (a GDAL ``/vsi…`` path, a URL) is kept."""
    text = os.fspath(path)
    if os.path.isabs(text) or text.startswith("/vsi") or "://" in text or is_web_source(text):
        return text
    return os.path.abspath(text)


def absolute_outputs(outs: OutputPaths) -> OutputPaths:
    """``outs`` with absolute paths (see :func:`absolute`)."""
    return replace(outs, class_raster=Path(absolute(outs.class_raster)),
                   confidence_raster=Path(absolute(outs.confidence_raster)),
                   polygons=Path(absolute(outs.polygons)),
                   manifest=Path(absolute(outs.manifest)) if outs.manifest else None)


class ModelOnWorker(_PluginBase):
    """A worker plugin: the model and its predictor, loaded at the worker's first file and
    kept for every file after (``loads`` counts the loads: one per worker)."""

    name = PLUGIN

    def __init__(self, model: str, sha256: str, params: SegmentParams,
                 head: int | None = None) -> None:
        super().__init__()
        self.model_path, self.sha256, self.params = model, sha256, params
        self.head = head  # a multi-head model's head (:mod:`.heads`)
        self.loads = 0
        self._model: TesseraModel | None = None
        self._predictor: Any = None

    def setup(self, worker: Any = None) -> None:
        """Nothing yet: the model is read at the first file."""

    def teardown(self, worker: Any = None) -> None:
        """Let the model go with the worker."""
        self._model = self._predictor = None

    def model(self) -> TesseraModel:
        """The model, read once; refused when it is not the file the batch was planned with."""
        if self._model is None:
            m = TesseraModel.open(self.model_path)
            if m.identity() != self.sha256:
                raise ModelError(f"{self.model_path}: this worker sees another file under "
                                 "that path than the client (all workers must share storage)",
                                 self.model_path)
            if self.head is not None:
                from ..model.heads import head_view

                m = head_view(m, self.head)
            self._model = m
            self.loads += 1
        return self._model

    def predictor(self) -> Any:
        """The predictor, made once."""
        if self._predictor is None:
            self._predictor = params_predictor(self.model(), self.params)
        return self._predictor


def run_on_worker(task: FileTask, params: SegmentParams) -> tuple[FileReport, Any]:
    """One file on a Dask worker: ``(row, None)``, or ``(row, (message, path))`` when the
    output folder itself is unusable (the client stops the batch)."""
    from distributed import get_worker

    plugin: ModelOnWorker = get_worker().plugins[PLUGIN]  # type: ignore[assignment]
    try:
        return run_one(task, plugin.model(), params, plugin.predictor), None
    except BatchStopped as stop:
        return stop.row, (stop.message, stop.path)


class DaskExecutor:
    """Runs a batch's files on a Dask cluster (see the module's notes); yields their rows as
    they finish. ``local:N`` starts and stops its own cluster."""

    def __init__(self, address: str, timeout: float = CONNECT_TIMEOUT) -> None:
        self.n_local = local_workers(address)  # a bad address fails before any work
        self.address, self.timeout = address, timeout
        self.label = ""

    def _params(self, params: SegmentParams) -> SegmentParams:
        if self.n_local and params.threads is None:  # N workers share this machine's cores
            return replace(params, threads=max(1, (os.cpu_count() or 1) // self.n_local))
        return params

    def run(self, plan: BatchPlan, progress_for: Callable[[FileTask], ProgressFn | None],
            cancel: CancelFn | None) -> Iterator[FileReport]:
        """Run the tasks on the cluster (see :class:`~.batch.Executor`)."""
        if plan.model.path is None:
            raise ParameterError("a cluster batch needs the model as a file every worker "
                                 "can read (not a model in memory)")
        for task in plan.tasks:  # done before: nothing to send anywhere
            if task.skip:
                yield run_one(task, plan.model, plan.params, _no_predictor)
        todo = [t for t in plan.tasks if not t.skip]
        if not todo:
            return
        params = self._params(plan.params)
        client, cluster = connect(self.address, self.timeout)
        try:
            yield from self._submit(client, plan, params, todo, cancel)
            clean_up(client, sorted({Path(absolute(t.dest)) for t in todo}))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def _submit(self, client: Any, plan: BatchPlan, params: SegmentParams,
                todo: list[FileTask], cancel: CancelFn | None) -> Iterator[FileReport]:
        distributed = _distributed()
        assert plan.model.path is not None  # (checked in run())
        client.register_plugin(ModelOnWorker(absolute(plan.model.path), plan.model.identity(),
                                             params), name=PLUGIN)
        workers = len(client.scheduler_info().get("workers", {}))
        self.label = f"on {workers} Dask worker{'s' if workers != 1 else ''}"
        log.info("batch of %d files %s (%s)", len(todo), self.label, self.address)
        tag = plan.model.identity()[:12]
        futures = [client.submit(run_on_worker, _on_workers(t), params, retries=RETRIES,
                                 pure=False, key=f"tessera-{tag}-{t.index}-{t.rel.as_posix()}")
                   for t in todo]
        try:
            for fut in distributed.as_completed(futures):
                if cancel is not None and cancel():
                    raise CancelledError("batch cancelled; files being segmented on the "
                                         "workers finish or leave nothing")
                try:
                    row, stop = fut.result()
                except distributed.KilledWorker as exc:
                    raise ClusterError(f"workers died running {exc.task}; see the workers' "
                                       "logs (out of memory?)") from exc
                except Exception as exc:
                    err = lost(exc, self.address, "the batch ran")
                    if err is None:
                        raise
                    raise err from exc
                if stop is not None:
                    raise BatchStopped(stop[0], stop[1], row)
                yield row
        finally:
            with contextlib.suppress(Exception):  # (a lost scheduler: nothing to cancel)
                client.cancel([f for f in futures if not f.done()])


def _on_workers(task: FileTask) -> FileTask:
    """``task`` with the absolute paths the workers need (see :func:`absolute`)."""
    return replace(task, source=Path(absolute(task.source)), dest=Path(absolute(task.dest)),
                   outputs=absolute_outputs(task.outputs))


def _remove_stale(folders: list[Path]) -> int:
    from ..io.atomic import remove_stale

    return sum(len(remove_stale(f)) for f in folders)


def clean_up(client: Any, folders: list[Path]) -> None:
    """Remove what workers killed mid-file left in ``folders``: each worker, and this client,
    clears the temporaries of dead processes of its own host (a host whose every worker died
    is cleared by the next Tessera run there)."""
    try:
        client.run(_remove_stale, folders)
    except Exception:  # noqa: BLE001  (a tidy-up: never the batch's failure)
        log.debug("cleaning up on the workers failed", exc_info=True)
    _remove_stale(folders)


def _no_predictor() -> Any:
    raise AssertionError("a file done before needs no model")  # pragma: no cover
