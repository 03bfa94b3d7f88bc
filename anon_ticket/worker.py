"""`python -m anon_ticket.worker INDEX LINK_FD PUBLIC_FD`: one worker process, started by the
owner (actors/worker.py) with its settings in ANON_TICKET_WORKER_SETTINGS. Not a command for
people: docs/architecture.md §8."""

from __future__ import annotations

import logging
import os
import sys

import trio

from anon_ticket import fdlimit, gctune, logs
from anon_ticket.config import settings_from_json
from anon_ticket.errors import AnonTicketError


def main(argv: list[str]) -> int:
    index, link_fd, public_fd = (int(a) for a in argv)
    settings = settings_from_json(os.environ.pop("ANON_TICKET_WORKER_SETTINGS"))
    default, targets = settings.log_levels()
    logs.configure(default, targets, settings.log_format)
    label = f"worker-{index}"

    def tag(record: logging.LogRecord) -> bool:
        """Every line says which worker wrote it: `actor=worker-2.public`."""
        record.actor = f"{label}.{getattr(record, 'actor', record.name)}"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    fdlimit.raise_to_hard_limit()  # as the owner does: a worker holds client connections
    gctune.settle()
    from supervisors.worker_tree import run_worker  # after logging is set up

    log = logs.get_logger("worker")
    try:
        return trio.run(run_worker, settings, index, link_fd, public_fd)
    except Exception as raised:  # the link ended or the tree gave up: the owner restarts us
        exc = _cause(raised)
        report = log.warning if isinstance(exc, AnonTicketError) else log.error
        report("worker ended", worker=index, error=f"{type(exc).__name__}: {exc}")
        return 1


def _cause(raised: BaseException) -> BaseException:
    """What ended the worker: the one exception of a group; of several, our own error when
    every other one is only a channel that error closed (the link's reader and writer both
    fail when the owner goes), else the group itself, as it is a bug."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(raised)
    ours = [e for e in leaves if isinstance(e, AnonTicketError)]
    consequences = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
    if len(leaves) == 1:
        return leaves[0]
    if ours and all(isinstance(e, (AnonTicketError, *consequences)) for e in leaves):
        return ours[0]
    return raised


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
