"""``python -m medtricks``: the ``medtricks`` command; what ``torchrun --nproc-per-node N -m medtricks run RECIPE``
starts in each of its processes."""

import sys

from medtricks.cli import main

if __name__ == "__main__":
    sys.exit(main())
