"""The product's suites: conformance (hypothesis) and performance (pytest-benchmark), run with pytest --pyargs suites."""
