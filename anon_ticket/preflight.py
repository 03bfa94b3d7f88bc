"""What `serve` checks before it creates anything: every problem at once, exit 2.

Settings are validated as they load (anon_ticket/config.py); what needs the machine is checked
here, before a data directory, a database or a socket is made: the primary address, the
listeners' addresses (free, or a socket path nobody listens on), and that the data
directory and the database can be written where they are meant to be.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from anon_ticket.config import Settings
from anon_ticket.datadir import DataDir
from anon_ticket.domain.address import validate_primary
from anon_ticket.errors import AnonTicketError, ConfigError, InvalidAddress
from anon_ticket.web import PortInUse, bind_tcp, check_socket_path

BIND_TRIES = 5
BIND_PAUSE = 0.5


def problems(settings: Settings) -> list[str]:
    holder = _holder(settings.data_dir)
    if holder is not None:  # the rest would only be its consequences (its sockets, its port)
        return [f"data directory {settings.data_dir} is in use by another anon-ticket "
                f"process (pid {holder}); stop it first"]
    found: list[str] = []
    if settings.primary_address:
        try:
            validate_primary(settings.primary_address)
        except InvalidAddress as exc:
            found.append(f"primary_address: {exc}")
    if settings.unix_socket is not None:
        found += _unix_path(settings.unix_socket, "unix_socket")
    else:
        found += _tcp(settings.bind_host, settings.bind_port, "bind_address")
    internal = settings.internal_socket_path
    if internal is not None:
        found += _unix_path(internal, "internal_unix_socket")
    elif settings.internal_bind is not None:
        found += _tcp(*settings.internal_bind, "internal_bind_address")
    found += _writable(settings.data_dir, "data_dir")
    found += _writable(settings.database_path.parent, "database_url")
    return found


def _holder(directory: Path) -> int | None:
    if not directory.is_dir():
        return None
    try:
        return DataDir(directory).holder_pid()
    except AnonTicketError:
        return None  # unreadable: the lock at start says why


def _tcp(host: str, port: int, what: str) -> list[str]:
    """Free, or taken by a process that lets go of it within BIND_TRIES * BIND_PAUSE seconds:
    after a crash a supervisor restarts us at once, and what the dead process left (a
    worker still exiting, a connection closing) may hold the port for a moment. nginx waits
    the same way (five tries, half a second apart)."""
    attempt = 1
    while True:
        try:
            bind_tcp(host, port).close()
        except PortInUse as exc:
            if attempt == BIND_TRIES:
                return [f"{what}: {problem}" for problem in exc.problems]
            if attempt == 1:
                print(f"anon-ticket: {what}: {host}:{port} is in use; trying again for "
                      f"{(BIND_TRIES - 1) * BIND_PAUSE:g} s", file=sys.stderr, flush=True)
            attempt += 1
            time.sleep(BIND_PAUSE)
        except ConfigError as exc:
            return [f"{what}: {problem}" for problem in exc.problems]
        else:
            return []


def _unix_path(path: Path, what: str) -> list[str]:
    try:
        check_socket_path(path)  # a stale socket is replaced at start
    except ConfigError as exc:
        return [f"{what}: {problem}" for problem in exc.problems]
    return []


def _writable(directory: Path, what: str) -> list[str]:
    """`directory`, or the nearest ancestor that exists (it will be made there), must be a
    directory this process can write."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"{what}: {probe} is not a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == directory else f" (to create {directory})"
        reason = "read-only" if _read_only(probe) else "not writable"
        return [f"{what}: {probe} is {reason}{where}"]
    return []


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
