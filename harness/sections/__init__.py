"""Report sections: one module per component; each registers its tables with `harness.report_sections.section`."""
