"""The one error type of the pipeline, and the one place it becomes a one-line exit.

Anything a user can fix (a param, a file, a missing stage output, a full disk) is raised as a StageError
whose message names the problem and the fix. Only a stage's entry point turns it into `error: ...` and
exit status 1; helpers never exit, so they stay usable from tests, benchmarks and other stages' code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class StageError(Exception):
    """A problem the user can fix; the message says what and how."""


def run_stage(main: Callable[[], int | None]) -> None:
    """Runs a stage's main: a StageError ends it with its message (no traceback) and status 1."""
    try:
        status = main()
    except StageError as error:
        sys.exit(f"error: {error}")
    sys.exit(status or 0)
