import sys

from autorank.bench.planners import main

sys.exit(main(prog="python -m autorank.bench.planners"))
