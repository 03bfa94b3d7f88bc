"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

`die_with_parent(sig)` is a `preexec_fn` that sets `PR_SET_PDEATHSIG`: the kernel sends `sig`
to the child when its parent goes, so no orphan keeps a port, a socket or a wallet file after
a kill -9. The signal fires when the *thread* that forked exits, not the process: fork from
the main thread (trio's own thread), never from a worker thread (trio's `open_process` forks
in one, which is why the callers use `subprocess.Popen` directly).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`, to call from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("fork from the main thread: PR_SET_PDEATHSIG fires when the "
                           "forking thread exits")
    prctl = _prctl()  # resolved in the parent: the child only calls it
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec
