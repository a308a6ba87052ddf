"""Benchmarks that print figures (JSON lines), never pass/fail: `make bench`."""
