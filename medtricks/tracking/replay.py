"""Send the MLflow writes a run kept while its tracking server was away.

A run whose MLflow store stopped answering keeps training and keeps its writes in
``<run_dir>/store/unsent.jsonl``; when the store is back::

    python -m medtricks.tracking.replay runs/quickstart/20261201-101406-d20d09
    python -m medtricks.tracking.replay RUN_DIR --uri http://new-host:5000   # the server moved

Exit status 0 when everything was sent (or nothing was waiting), 1 when the store still does not answer
(what is left stays in the spool file; run the command again later) or does not know the run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from medtricks.errors import MedtricksError
from medtricks.tracking.mlflow_store import replay_unsent

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medtricks.tracking.replay", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run folder (or its store/unsent.jsonl file)")
    parser.add_argument("--uri", default=None, help="send to this tracking URI instead of the one the run used")
    args = parser.parse_args(argv)
    try:
        sent = replay_unsent(args.run_dir, uri=args.uri)
    except MedtricksError as err:  # the store still away, an unknown run, a wrong path
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"sent {sent} kept writes" if sent else "nothing waiting to be sent")
    return 0


if __name__ == "__main__":  # pragma: no cover - the command line
    sys.exit(main())
