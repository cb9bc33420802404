"""``python -m edgewire.cli``: the same command as the ``edgewire`` console script."""

from edgewire.cli.app import app

app(prog_name="edgewire")
