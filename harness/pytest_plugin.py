"""pytest plugin (entry point `pytest11`): options, markers, hypothesis profiles, implementation fixtures."""
