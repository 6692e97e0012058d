"""Benchmarks and checks of autorank, as commands: `autorank-bench NAME [options]`
(or `python -m autorank.bench NAME ...`); `autorank-bench` alone lists them.

The top layer beside the app: a command may use anything below it (the search stack included).
Importing this package imports nothing else; each command's module is imported when it runs.
docs/BENCHMARKS.md gives each figure with the command that produced it.
"""
