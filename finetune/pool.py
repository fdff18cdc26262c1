"""A process pool for work on many items: results in task order, a bounded number of tasks in flight, and a
worker that dies (killed for memory, a crashing decoder) failing the run with a message instead of leaving it
waiting forever (multiprocessing.Pool would).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

from finetune.errors import StageError

PR_SET_PDEATHSIG = 1  # Linux prctl option: the signal a process gets when its parent dies



TASKS_IN_FLIGHT_PER_WORKER = 3  # bounds what waits in memory between the processes and the writer



def ordered_results(function: Callable, tasks: Iterable[tuple], workers: int) -> Iterator:
    """function(*task) for each task, in task order, computed by `workers` processes with a bounded number of
    tasks in flight. A process that dies (killed for memory, a crashing decoder) fails the run with a message
    instead of leaving it waiting forever (multiprocessing.Pool would)."""
    if workers <= 1:
        yield from (function(*task) for task in tasks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=die_with_parent,
                               initargs=(os.getpid(),))
    pending = deque()
    try:
        for task in tasks:
            pending.append((task, pool.submit(function, *task)))
            if len(pending) >= workers * TASKS_IN_FLIGHT_PER_WORKER:
                yield wait_for(*pending.popleft())
        while pending:
            yield wait_for(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)



def die_with_parent(parent: int) -> None:
    """In each decode process: end when the stage's process dies. Killed with SIGKILL, the stage runs no handler
    to shut its pool down, and its decode processes would wait forever to hand a result to it, holding their
    memory (~640 MB each, seen). Linux ends them by itself once told (PR_SET_PDEATHSIG); elsewhere a thread
    checks every second."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it died before the kernel was told
        os._exit(1)



def wait_for(task: tuple, future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise StageError(f"a prepare process died while working on {describe_task(task)} (killed by the system, "
                         f"usually for lack of memory, or crashed in an image decoder). Lower prepare.num_workers "
                         f"to use less memory, then run `dvc repro prepare` again") from None



def describe_task(task: tuple) -> str:
    if len(task) >= 4 and isinstance(task[2], int):
        return f"images {task[2]}-{task[3] - 1} of split '{task[1]}'"
    return repr(task)
