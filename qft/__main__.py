"""``python -m qft``: the command line (``qft.cli``)."""

import sys

from qft.cli import main

if __name__ == "__main__":
    sys.exit(main())
