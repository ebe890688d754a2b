"""fastfat benchmarks: pytest-benchmark suites (fast path against its reference twin, one group
per operation) and `python -m bench.compare`, the side-by-side FAT-epoch and evaluation report.
See bench/README.md."""
