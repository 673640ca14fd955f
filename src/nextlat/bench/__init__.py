"""Benchmarks: training-step cost and decoding speed, measured side by side."""
