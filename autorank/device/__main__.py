"""`python -m autorank.device PLAN CHECKPOINT DATA ...` (see autorank/device/__init__.py)."""

import sys

from autorank.device.guard import main

if __name__ == "__main__":
    sys.exit(main())
