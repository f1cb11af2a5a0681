"""``python -m medtricks.cli``: the ``medtricks`` command without the console-script wrapper."""

import sys

from medtricks.cli import main

if __name__ == "__main__":
    sys.exit(main())
