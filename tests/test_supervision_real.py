"""Supervision with the real actors: crashes on purpose, 503 meanwhile, escalation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apsw
import httpx
import trio

from actors.storage import Handled, Storage
from anon_ticket.domain.ids import PaymentId
from anon_ticket.domain.messages import Committed
from supervisors.tree import EXIT_FAILURE, run_server
from tests.harness import make_settings, running_server


class Crash:
    """Nothing any actor knows: a handler given it raises, as a bug would (an actor given it
    as a message answers that it has no handler for it, and goes on)."""


class CrashableStorage(Storage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handlers[Crash] = self._crash
        self._kinds[Crash] = "crash"

    def _crash(self, msg: Crash) -> Handled:
        raise RuntimeError("injected crash")


async def hammer_until_served(srv: Any, pid: PaymentId, crash: Any) -> list[int]:
    """Redeem continuously across a crash and its restart; return every status seen, up to
    a 200 for a request sent after the first 503 came back (a request the crashed actor had
    passed on before it crashed may be answered 200 later, while it is still down)."""
    seen: list[int] = []
    first_503: float | None = None
    with trio.move_on_after(30):  # the test fails below rather than hang
        async with trio.open_nursery() as n:
            async def loop() -> None:
                nonlocal first_503
                while True:
                    sent = trio.current_time()
                    with trio.fail_after(10):  # never a hung request
                        resp = await srv.redeem(pid.hex())
                    seen.append(resp.status_code)
                    if resp.status_code == 503:
                        assert resp.headers["retry-after"]
                        if first_503 is None:
                            first_503 = trio.current_time()
                    if resp.status_code == 200 and first_503 is not None and sent > first_503:
                        n.cancel_scope.cancel()
            # Several clients: a request queued before the crash waits in the surviving
            # mailbox and is served after the restart; new ones in the window get 503.
            for _ in range(8):
                n.start_soon(loop)
            await trio.sleep(0.05)
            await crash()
    assert seen and seen[-1] == 200, f"not served again within 30 s: {seen[-5:]}"
    return seen


async def test_storage_crash_is_restarted_and_meanwhile_redeem_is_503(tmp_path: Path) -> None:
    async with running_server(tmp_path, backoff_initial_secs=0.3, backoff_max_secs=0.6,
                              tree_options={"storage_factory": CrashableStorage}) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)

        async def crash() -> None:
            try:
                await srv.tree.mailboxes.storage.ask(Crash(), 1)
            except Exception as exc:  # the crashing batch answers "restarting"
                assert type(exc).__name__ == "Unavailable"

        seen = await hammer_until_served(srv, pid, crash)
        assert set(seen) <= {200, 503}, set(seen)  # never a 404, never a 500
        assert 503 in seen
        status = (await srv.internal.get("/admin/status")).json()
        storage = status["actors"][0]["children"][0]
        assert storage["restarts"] == 1 and "injected crash" in storage["last_error"]
        assert storage["state"] == "running"
        metrics = (await srv.internal.get("/metrics")).text
        assert 'anon_ticket_actor_restarts_total{actor="storage"} 1.0' in metrics
        assert 'anon_ticket_actor_restarts_total{actor="filter"} 1.0' in metrics  # rest-for-one
        filt = status["actors"][0]["children"][1]
        assert filt["state"] == "running"  # rest-for-one: rebuilt after storage


async def test_filter_crash_answers_503_never_a_wrong_404(tmp_path: Path) -> None:
    async with running_server(tmp_path, backoff_initial_secs=0.3, backoff_max_secs=0.6) as srv:
        pid = PaymentId.generate()
        await srv.pay(pid)

        async def crash() -> None:
            srv.tree.mailboxes.filter.tell(Committed((Crash(),)))  # an effect it cannot apply

        seen = await hammer_until_served(srv, pid, crash)
        assert set(seen) <= {200, 503}, set(seen)
        assert 503 in seen
        # the rebuilt filter still knows the recorded id (prewarmed from the database)
        assert (await srv.redeem(pid.hex())).json()["status"] == "already_claimed"


async def test_restart_intensity_escalates_to_exit_1(tmp_path: Path) -> None:
    opened = 0

    def on_open(conn: apsw.Connection) -> None:
        nonlocal opened
        opened += 1
        if opened > 1:
            raise apsw.IOError("disk I/O error (injected)")

    settings = make_settings(tmp_path / "data", restart_intensity=2,
                             backoff_initial_secs=0.01, backoff_max_secs=0.02)
    url = f"http://{settings.bind_host}:{settings.bind_port}"
    code: list[int] = []

    async def serve() -> None:
        code.append(await run_server(settings, on_open=on_open))

    with trio.fail_after(30):
        async with trio.open_nursery() as n, httpx.AsyncClient(base_url=url) as client:
            n.start_soon(serve)
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.02)
            # A restart on the operator's command; from then on every open of the
            # database fails, so storage crash-loops until the root supervisor gives up.
            transport = httpx.AsyncHTTPTransport(uds=str(settings.internal_socket_path))
            async with httpx.AsyncClient(transport=transport, base_url="http://i") as internal:
                resp = await internal.post("/admin/actors/storage/restart")
                assert resp.status_code == 200
    assert code == [EXIT_FAILURE]
    assert opened > 2
