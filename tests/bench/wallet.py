"""A fake monero-wallet-rpc for the benchmark: the server's own way in for payments.

    python -m tests.bench.wallet --height H [--confirmations C]

Answers the JSON-RPC calls the server's poller makes (`refresh`, `get_height`, `get_address`,
`query_key`: a watch-only wallet, `get_transfers`, `get_transfer_by_txid`: it knows every
txid, as the wallet that paid every recorded transfer would) on a free loopback port, from a
set of incoming transfers: those it loads from a file and those it pumps. It knows the
transfers at heights up to its own; the server credits those at least C blocks deep. Its
height must stay 20 blocks (the poller's recent window) above what the server already
recorded. Prints `{"ready": PORT}`, then obeys lines on stdin, answering each with one JSON
line:

- `load FILE`: add the transfers of FILE (one `txid_hex pid_hex amount height` a line, in
  height order, above those it has);
- `height N`: the wallet's height is N from now on (the ingestion section holds it below the
  file's transfers, then releases them all at once);
- `pump PID K`: from now on every `get_height` (one a poller tick) finds a new block with K
  transfers to PID, C blocks deep, and 21 blocks above the last one (so the poller's recent
  window, 20 blocks, holds only the newest): a stream of top-ups to one ticket, each a
  committed event for its watchers;
- `stop`: no more blocks; `quit`: exit.

It runs as its own process pinned beside the load generator, so what it costs is not counted
as the server's CPU time. Each entry is encoded once, when it is made.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ADDRESS = "4" + "A" * 94
WATCH_ONLY = -29  # what wallet-rpc answers `query_key spend_key` on a watch-only wallet
PUMP_STEP = 21
TOP_UP = 10**12  # 1 XMR: above any minimum payment, so every pumped transfer is credited


def _entry(txid: str, pid: str, amount: int, height: int) -> str:
    return json.dumps({"txid": txid, "payment_id": pid, "amount": amount, "height": height,
                       "type": "in", "unlock_time": 0, "subaddr_index": {"major": 0,
                                                                          "minor": 0}},
                      separators=(",", ":"))


class Chain:
    """The wallet's incoming transfers, sorted by height, each with its JSON."""

    def __init__(self, height: int, confirmations: int) -> None:
        self.lock = threading.Lock()
        self.height = height
        self.confirmations = confirmations
        self.heights: list[int] = []
        self.encoded: list[str] = []
        self.by_txid: dict[str, str] = {}
        self.pump: tuple[str, int] | None = None

    def load(self, path: Path) -> None:
        with open(path) as f:
            for line in f:
                txid, pid, amount, height = line.split()
                self.add(txid, pid, int(amount), int(height))

    def add(self, txid: str, pid: str, amount: int, height: int) -> None:
        """Transfers come in height order (the file's, then pumped blocks above them)."""
        text = _entry(txid, pid, amount, height)
        self.heights.append(height)
        self.encoded.append(text)
        self.by_txid[txid] = text

    def tick(self) -> int:
        with self.lock:
            if self.pump is not None:
                pid, count = self.pump
                self.height += PUMP_STEP
                block = self.height - self.confirmations
                for _ in range(count):
                    self.add(os.urandom(32).hex(), pid, TOP_UP, block)
            return self.height

    def incoming(self, low: int, high: int) -> str:
        """The JSON list of the entries with low < height <= min(high, the wallet's)."""
        with self.lock:
            top = min(high, self.height)
            i = bisect.bisect_right(self.heights, low)
            j = bisect.bisect_right(self.heights, top)
            return "[" + ",".join(self.encoded[i:j]) + "]"


def serve(chain: Chain) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without this the second waits for the
        # client's delayed ACK (40 ms a call).
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            method, params = req.get("method"), req.get("params") or {}
            result: str | None = None
            error: tuple[int, str] | None = None
            if method == "refresh":
                result = "{}"
            elif method == "get_height":
                result = json.dumps({"height": chain.tick()})
            elif method == "get_address":
                result = json.dumps({"address": ADDRESS})
            elif method == "query_key":
                error = (WATCH_ONLY, "The wallet is watch-only. Cannot retrieve spend key.")
            elif method == "get_transfers":
                low = int(params.get("min_height", 0)) if params.get("filter_by_height") else -1
                high = int(params.get("max_height", 2**62)) if params.get(
                    "filter_by_height") else 2**62
                result = '{"in":' + chain.incoming(low, high) + "}" if params.get("in") \
                    else "{}"
            elif method == "get_transfer_by_txid":
                # Every transfer the server recorded came from this wallet, the imported ones
                # too: a real wallet knows them all, so none is declared vanished.
                txid = str(params.get("txid"))
                found = chain.by_txid.get(txid) or _entry(txid, "0" * 16, 0, 0)
                result = '{"transfer":' + found + "}"
            else:
                error = (-32601, "Method not found")
            if error is not None:
                body = json.dumps({"jsonrpc": "2.0", "id": req.get("id"),
                                   "error": {"code": error[0], "message": error[1]}})
            else:
                body = f'{{"jsonrpc":"2.0","id":{json.dumps(req.get("id"))},"result":{result}}}'
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.wallet")
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--confirmations", type=int, default=10)
    args = p.parse_args(argv)
    chain = Chain(args.height, args.confirmations)
    server = serve(chain)
    _say({"ready": server.server_address[1], "transfers": len(chain.heights)})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        with chain.lock:
            if words[0] == "load":
                chain.load(Path(words[1]))
            elif words[0] == "height":
                chain.height = int(words[1])
            elif words[0] == "pump":
                chain.pump = (words[1], int(words[2]))
            elif words[0] == "stop":
                chain.pump = None
        if words[0] == "quit":
            break
        _say({"ok": words[0], "height": chain.height, "transfers": len(chain.heights)})
    server.shutdown()
    _say({"bye": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
