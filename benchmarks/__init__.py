"""Benchmarks: throughput measurements and the comparison harness (benchmarks/compare)."""
