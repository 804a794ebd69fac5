"""One module per CLI subcommand; each has `register(subparsers)` that adds its parser and sets `func`."""
