"""Tests of the benchmarks package (``benchmarks/apps``): the comparison apps and bundle."""
