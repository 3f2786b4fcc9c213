"""Performance suites: side-by-side measurements with pytest-benchmark; speed claims are ratios in one run."""
