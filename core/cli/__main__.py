"""``python -m tessera.core.cli``: the ``tessera`` command."""

import sys

from .commands import main

sys.exit(main())
