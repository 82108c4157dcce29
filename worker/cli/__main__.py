"""`python -m worker.cli ...` is `cxr ...` with this interpreter."""

import sys

from worker.cli import main

sys.exit(main())
