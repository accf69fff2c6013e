"""``ledgerlens``: the command-line way into the platform (typer + rich)."""
