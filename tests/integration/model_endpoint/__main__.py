"""``python -m tests.integration.model_endpoint serve ...``: see the package docstring."""

import sys

from .server import main

main(sys.argv[1:])
