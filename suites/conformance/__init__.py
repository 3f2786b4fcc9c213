"""Conformance suites: property tests any implementation registered in harness.registry can be run against."""
