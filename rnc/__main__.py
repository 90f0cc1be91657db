"""`python -m rnc ...` is `rnc ...` (what a Ray Job's entrypoint runs)."""

import sys

from rnc.cli import main

sys.exit(main())
