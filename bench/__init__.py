"""Benchmarks and drills (python -m bench.performance; python bench/reliability_drill.py)."""
