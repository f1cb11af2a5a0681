"""What more than one command module of the CLI uses: a help text and the torchrun check (no torch import)."""

from __future__ import annotations

import os

RUNS_DIR_HELP = (
    "the local run store (tracking.backend: none) to look run ids up in and, for such runs, to log "
    "into (default: runs for ids; the run folder's own experiment.output_dir for logging)"
)


def under_torchrun() -> bool:
    # The environment check of medtricks.train.distributed.launched(), without importing torch for every command.
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
