"""``python -m diffpost`` is the ``diffpost`` command."""

import sys

from diffpost.cli import main

sys.exit(main())
