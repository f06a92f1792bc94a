"""``python -m smoothlab`` (and ``torchrun ... -m smoothlab train ...``): the CLI.

``python -m`` puts the working folder first on ``sys.path``. smoothlab's sibling packages have
common names (``hybrid``, ``analysis``, ``figures``), so a user's ``figures.py`` there would
replace them; unless smoothlab itself is imported from that folder (a source checkout), it is
taken off the path, as the ``smoothlab`` console script never has it.
"""

import os
import sys
from pathlib import Path


def _drop_working_folder(path: list[str], package_parent: Path) -> list[str]:
    """``path`` without a leading entry naming the working folder ('' or the folder
    itself), unless ``package_parent`` (the folder holding the running ``smoothlab``) is it."""
    try:
        cwd = Path(os.getcwd())
        if not path or path[0] not in ("", str(cwd)) or package_parent.resolve() == cwd.resolve():
            return path
    except OSError:  # the working folder is gone: nothing to shadow anything
        return path
    return path[1:]


if __name__ == "__main__":
    sys.path[:] = _drop_working_folder(sys.path, Path(__file__).resolve().parent.parent)

    from smoothlab.cli import main

    sys.exit(main())
