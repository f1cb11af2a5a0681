"""``python -m medtricks.train.torchrun ARGS``: torchrun (``python -m torch.distributed.run ARGS``) that reports
a failure of its processes once, in one line when it is a user-fixable error (what ``medtricks run --nproc
N`` runs; see :func:`medtricks.train.distributed.launch`)."""

import sys

from medtricks.train.distributed import launch

if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
