"""`pytest bench --benchmark-only`: the host-side micro-benchmarks (pytest-benchmark)."""
