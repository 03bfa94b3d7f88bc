"""What `serve` checks before it creates anything: every problem at once, exit 2.

Settings are validated as they load (anon_ticket/config.py); what needs the machine is checked
here, before a data directory, a database or a socket is made: the primary address, the
listeners' addresses (free, or a socket path nobody listens on), and that the data
directory and the database can be written where they are meant to be.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from anon_ticket.config import Settings
from anon_ticket.datadir import DataDir
from anon_ticket.domain.address import validate_primary
from anon_ticket.errors import AnonTicketError, InvalidAddress

MAX_UNIX_PATH = 107


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
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return [f"{what}: {host}:{port} is already in use"]
            return [f"{what}: cannot bind {host}:{port}: {exc.strerror}"]
    return []


def _unix_path(path: Path, what: str) -> list[str]:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        return [f"{what}: unix socket path {path} is longer than {MAX_UNIX_PATH} bytes; "
                "choose a shorter path"]
    try:
        st = path.lstat()
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"{what}: cannot look at {path}: {exc.strerror}"]
    if not stat.S_ISSOCK(st.st_mode):
        return [f"{what}: {path} exists and is not a socket; refusing to replace it"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return []  # stale: replaced at start
    return [f"{what}: {path} is a live socket: another process listens there"]


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
