"""Benchmarks run by `musetalk-service bench`: speed is measured here, never asserted in tests."""

RUNS = ("cold", "warm", "face_box", "silence30")
"""The end-to-end bench's runs made unless others are asked for (`benchmark.lipsync` says what each is)."""
EXTRA_RUNS = ("warm_intermediate",)
"""Its runs made only when asked for."""
