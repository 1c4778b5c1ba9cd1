"""Helpers for megalora's tests and benchmarks (not needed to use megalora)."""
