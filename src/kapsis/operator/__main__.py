"""``python -m kapsis.operator``: run the operator (standalone kopf) until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from kapsis.operator.runner import main

if __name__ == "__main__":
    sys.exit(main())
