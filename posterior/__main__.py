"""``python -m posterior`` is the ``posterior`` command."""

import sys

from posterior.cli import main

sys.exit(main())
