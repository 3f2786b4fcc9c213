"""harness: the analytic cost model, benchmark workloads and experiments, results, reports, the CLI `dsv3`, the pytest
plugin, and the protocols and adapters of the implementations under test."""
