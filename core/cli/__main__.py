"""``python -m tessera.core.cli``: the ``tessera`` command."""

import sys

from .commands import main

if __name__ == "__main__":  # spawned processes (Dask's local workers) import it
    sys.exit(main())
