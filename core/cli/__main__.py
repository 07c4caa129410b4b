"""``python -m tessera.core.cli``: the ``tessera`` command."""

from .commands import run

if __name__ == "__main__":  # spawned processes (Dask's local workers) import it
    run()
