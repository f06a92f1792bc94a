"""``python -m smoothlab`` (and ``torchrun ... -m smoothlab train ...``): the CLI."""

import sys

from smoothlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
