"""The one error type of the pipeline, and the one place it becomes a one-line exit.

Anything a user can fix (a param, a file, a missing stage output, a full disk) is raised as a StageError
whose message names the problem and the fix. Only a stage's entry point turns it into `error: ...` and
exit status 1; helpers never exit, so they stay usable from tests, benchmarks and other stages' code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm


class StageError(Exception):
    """A problem the user can fix; the message says what and how."""


def run_stage(main: Callable[[], int | None]) -> None:
    """Runs a stage's main: a StageError ends it with its message (no traceback) and status 1. Whatever ends it,
    the progress bars still drawn are cleared first, so its last line starts a line of its own."""
    try:
        status = main()
    except StageError as error:
        status = f"error: {error}"
    except SystemExit as stopped:  # a stage's own exit with its message (train stopped by a signal)
        status = stopped.code
    clear_progress_bars()
    sys.exit(status or 0)


def clear_progress_bars() -> None:
    """Closes the bars an exception left drawn: a bar whose loop had not started when a signal or an error came
    is not closed by its loop, and the frame the traceback keeps holds it until exit. CI once read
    `epoch 2/4:   0%| ... [00:00<?, ?batch/s]train: interrupted in epoch 2 of 4...` as one line."""
    for bar in list(tqdm._instances):
        bar.close()
