"""Benchmarks: scripts that measure and write their results under bench/results (never tests)."""
