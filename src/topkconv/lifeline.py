"""Worker processes that die with their parent: the first thing a spawned worker runs.

Standard library only, on purpose: a spawned worker imports the module of its initializer before anything
else, and torch takes seconds to import. Were this in a module that imports torch, a parent killed in
those seconds would leave its workers running (reparented to pid 1) until their imports end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, every: float = 0.5) -> None:
    """End this process when ``parent_pid`` (its parent) dies: Linux's parent-death signal where there is
    one, and on every system a thread that checks the parent's pid ``every`` seconds."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(every)
        os._exit(1)

    threading.Thread(target=watch, name="topkconv-parent-watch", daemon=True).start()


def init_worker(parent_pid: int, torch_threads: int = 1) -> None:
    """A job worker's initializer: Ctrl-C is the parent's to handle (it stops the workers), the worker
    dies with its parent, and it runs ``torch_threads`` torch threads (one: N workers use N cores)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    import torch
    from tqdm import tqdm

    torch.set_num_threads(torch_threads)
    # tqdm's default lock is a named POSIX semaphore, which a worker stopped by its parent (Ctrl-C) never
    # unlinks, and multiprocessing's resource tracker then warns of it when the parent exits; a worker prints
    # no bars, so a thread lock does
    tqdm.set_lock(threading.RLock())
