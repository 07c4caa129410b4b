"""The ``tessera`` command: a thin layer of options (:mod:`.parser`) over typed jobs run
in-process (:mod:`.commands`). ``python -m tessera.core.cli`` runs it too."""

from .commands import main, run

__all__ = ["main", "run"]
