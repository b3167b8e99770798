"""Measurements of the project, each writing its figures to benchmarks/results (run from the
project root: python -m benchmarks.<name>)."""
