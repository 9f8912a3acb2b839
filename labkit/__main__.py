"""``python -m labkit``: the same as the ``labkit`` command."""

from labkit.cli import cli

cli(prog_name="labkit")
