"""Deliberately broken implementations (one bug each) that `dsv3 conform` must catch: tests/test_mutants.py runs the
suites against each (`--impl dsv3_mutants.<component>:<name>`) and asserts the property that must fail.
Importable as `dsv3_mutants` once tests/ is on sys.path (pytest puts it there)."""
