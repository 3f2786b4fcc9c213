"""The product's suites: conformance (hypothesis) and performance (pytest-benchmark); `pytest --pyargs suites`."""
