"""``python -m ledgerlens.cli``: the same as the ``ledgerlens`` command."""

from ledgerlens.cli.main import app

app(prog_name="ledgerlens")
