"""``python -m kapsis``: the same as the ``kapsis`` command (through the start-up server)."""

from kapsis.forkserver.client import main

main()
