"""Benchmarks and evaluations: `canvaslm bench ...` (cli.py) and `canvaslm quality` (quality.py)."""
