"""``python -m seedtune``: the seedtune command line, for hosts where the console script is not on PATH."""

import sys

from seedtune.cli import main

sys.exit(main())
