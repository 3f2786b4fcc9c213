"""Benchmark workloads and their record builders, one module per component. Report sections and performance
suites both import from here (never from a section), so a workload is defined once."""
