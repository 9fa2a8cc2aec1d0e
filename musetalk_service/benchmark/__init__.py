"""Benchmarks run by `musetalk-service bench`: speed is measured here, never asserted in tests."""
