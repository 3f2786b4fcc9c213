"""Implementations under test: one module per component; each registers with `harness.registry`."""
