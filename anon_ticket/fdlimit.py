"""File descriptors: the process's limit and the public listener's share of it (I14).

At start the soft limit is raised to the hard limit (the default soft limit, 1024, is a few
hundred idle clients). Connections are capped below it, keeping a reserve for what the
process itself opens (the database and its checkpoint and backup connections, the wallet's
HTTP connections, the dev chain's pipes) and for the internal socket's own connections, so
accept() never fails with EMFILE and an operator always gets in.
"""

from __future__ import annotations

import resource

from anon_ticket.logs import get_logger

log = get_logger("limits")

RESERVE = 128  # descriptors kept for the process itself
INTERNAL_CONNECTIONS = 64  # the internal listener's own cap (actors/internal.py)


def raise_to_hard_limit() -> int:
    """Raise the soft descriptor limit to the hard one; the soft limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the descriptor limit", soft=soft, hard=hard, error=str(exc))
        return soft
    log.info("descriptor limit raised", soft_was=soft, soft=hard)
    return hard


def connection_cap(requested: int) -> int:
    """`requested`, lowered to fit the soft descriptor limit in force now."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    room = max(16, soft - RESERVE - INTERNAL_CONNECTIONS)
    if requested > room:
        log.warning("max_connections lowered to fit the descriptor limit",
                    requested=requested, cap=room, descriptor_limit=soft)
        return room
    return requested
