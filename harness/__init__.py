"""harness: measurement, analytic and measured metrics, results, reports, the CI gate, CLI `dsv3`, pytest plugin."""
