"""One module per `stg-ext` command: `add_parser(subparsers)` registers it, `run(args)` runs it."""
