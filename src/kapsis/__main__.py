"""``python -m kapsis``: the same as the ``kapsis`` command."""

from kapsis.cli import main

main()
