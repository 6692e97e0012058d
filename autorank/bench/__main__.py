import sys

from autorank.bench.cli import main

sys.exit(main())
