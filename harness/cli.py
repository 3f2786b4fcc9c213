"""The `dsv3` command line."""


def main() -> int:
    raise SystemExit("dsv3: not built yet")
