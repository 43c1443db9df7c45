"""``python -m prefprune`` (and ``torchrun ... -m prefprune score ...``): the command-line interface."""

import sys

from prefprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
