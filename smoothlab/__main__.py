"""``python -m smoothlab`` (and ``torchrun ... -m smoothlab train ...``): the CLI."""

import sys

if __name__ == "__main__":
    from smoothlab.cli import main

    sys.exit(main())
