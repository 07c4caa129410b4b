"""Run an engine job in a QgsTask: progress and cancel in the UI, layers added on the main thread.

The task itself touches no layer and no project: it runs the worker process with plain values
and keeps the result; ``on_done`` (called from ``finished()``, on the main thread) adds layers.
A layer the engine cannot read itself comes as an export prepared on the main thread
(:class:`~..bridge.export.LayerExport`, a clone of its provider): the task writes it first and
removes it when the run ends, however it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qgis.core import QgsFeedback, QgsTask
from qgis.PyQt.QtCore import QObject, Qt, pyqtSignal, pyqtSlot

from ..bridge import compat, engine
from ..core.errors import CancelledError, TesseraError
from ..core.jobs import client
from ..core.jobs.spec import Job


class Relay(QObject):
    """Calls ``fn(text)`` on the main thread when a task's signal fires in its own thread
    (a signal connected to a plain function would run it in the task's thread, where no
    widget may be touched)."""

    def __init__(self, fn: Callable[[str], None]) -> None:
        super().__init__()
        self.fn = fn

    @pyqtSlot(str)
    def call(self, text: str) -> None:
        """Run ``fn`` (main thread)."""
        self.fn(text)


class EngineTask(QgsTask):
    """A cancellable background task running one worker job."""

    progressText = pyqtSignal(str)  # noqa: N815  (Qt naming)
    #: an engine warning, as it comes (before the run for the input checks: pixel size...)
    warning = pyqtSignal(str)

    def __init__(self, description: str, job: Job | dict[str, Any], python: str,
                 on_done: Callable[[EngineTask], None] | None = None,
                 hidden: bool = False, export: Any = None) -> None:
        """``job`` is validated here, on the main thread: a bad parameter raises
        :class:`~..core.errors.ParameterError` before anything starts. ``hidden``: a short
        background check, kept out of the task manager where QGIS can. ``export``: a
        :class:`~..bridge.export.LayerExport` written before the job runs (the job reads
        its path) and removed after."""
        super().__init__(description, compat.task_flags(hidden))
        self.job, self.python, self.on_done = engine.prepare(job), python, on_done
        self.export = export
        self._feedback: QgsFeedback | None = None  # the export's, while it is written
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.cancelled_by_user = False
        self.last_event: dict[str, Any] = {}
        #: the engine's warnings during the run (also in the QGIS message log), as they came
        self.warnings: list[str] = []
        #: the result's warnings that did not come during the run
        self.late_warnings: list[str] = []

    def run(self) -> bool:
        def on_event(ev: dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind == "progress":
                self.last_event = ev
                self.setProgress(100.0 * float(ev.get("fraction", 0)))
                self.progressText.emit(engine.progress_text(ev))
            elif kind == "log" and engine.forward_log(ev) >= logging.WARNING:
                msg = str(ev.get("message"))
                if msg not in self.warnings:
                    self.warnings.append(msg)
                    self.warning.emit(msg)

        try:
            if self.export is not None:
                self._write_export()
            self.result = client.run_job(self.job, self.python, on_event, self.isCanceled)
            self.late_warnings = [w for w in dict.fromkeys(self.result.get("warnings") or [])
                                  if w not in self.warnings]
            return True
        except CancelledError:
            # a cancel the user asked for is not a failure: ending "complete" keeps QGIS from
            # announcing "Task failed" on top of Tessera's "cancelled"
            self.cancelled_by_user = True
            self.error = "cancelled"
            return True
        except TesseraError as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001  (a task must never raise into QGIS)
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            if self.export is not None:
                self.export.remove()

    def _write_export(self) -> None:
        """Write the layer's export (this task's thread), its progress as the task's;
        raises :class:`CancelledError` when cancelled, :class:`TesseraError` when it fails."""
        from qgis.core import QgsProcessingException

        from ..bridge.export import CANCELLED

        self.progressText.emit(self.export.describe())
        self._feedback = QgsFeedback()
        self._feedback.progressChanged.connect(self.setProgress, Qt.ConnectionType.DirectConnection)
        if self.isCanceled():
            raise CancelledError(CANCELLED)
        try:
            self.export.write(self._feedback)
        except QgsProcessingException as exc:
            if self._feedback.isCanceled():
                raise CancelledError(CANCELLED) from exc
            raise TesseraError(str(exc)) from exc
        finally:
            self._feedback = None
        self.setProgress(0.0)

    def cancel(self) -> None:
        """Cancel the run, the export it is writing too."""
        super().cancel()
        feedback = self._feedback
        if feedback is not None:
            feedback.cancel()

    def detach(self) -> None:
        """Forget ``on_done`` and cancel: for when its receiver (a dock, the plugin) goes away."""
        self.on_done = None
        try:
            self.cancel()
        except RuntimeError:  # the C++ task is already gone
            pass

    def finished(self, ok: bool) -> None:  # main thread
        if self.export is not None:  # (a task cancelled before it ran never wrote it)
            self.export.remove()
        if self.isCanceled() and self.result is None:  # also when cancelled before it ran
            self.cancelled_by_user, self.error = True, "cancelled"
        if self.on_done is None:
            return
        try:
            self.on_done(self)
        except Exception:  # an exception raised into Qt aborts QGIS
            logging.getLogger("tessera").exception("Tessera: handling the end of %s failed",
                                                   self.description())
