"""The `dsv3` subcommands, one module each: `HELP` (one line), `add_arguments(parser)`, `run(args) -> exit code` and
`INPUT_ERRORS` (the exception types that mean bad input: printed as one line, exit 2). The CLI finds them here,
so adding a command touches no other file."""
