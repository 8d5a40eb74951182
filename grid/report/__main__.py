"""`python -m grid.report DIR`: the same as `python -m grid report DIR`."""

import sys

from grid.report import main

sys.exit(main())
