"""The `hf-moe` command line: one module per subcommand, each a thin parser over a library function."""
