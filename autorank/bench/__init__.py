"""Benchmarks that rerun a comparison from the command line (python -m autorank.bench.<name>)."""
