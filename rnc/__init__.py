"""The `rnc` command line: one entry point over the subcommands of pipelines/ and serve/ (see rnc/cli.py)."""
