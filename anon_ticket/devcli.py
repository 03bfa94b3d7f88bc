"""`anon-ticket dev pay ADDRESS AMOUNT_XMR` and `anon-ticket dev mine N`: drive the dev chain.

They talk to the chain that `serve --dev-chain` runs under `<data-dir>/devchain`, found through
its `devchain.json` (written once the chain is ready, removed when it stops).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anon_ticket.devchain import INFO_FILE, DevChainInfo, mine, pay, xmr_to_atomic
from anon_ticket.errors import InvalidInput, RpcError, RpcUnavailable

DEVCHAIN_DIR = "devchain"
MAX_BLOCKS = 10_000


def add_dev_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser(
        "dev", help="drive the dev chain of `serve --dev-chain` (pay, mine)")
    dsub = dev.add_subparsers(dest="dev_cmd", required=True, metavar="COMMAND")
    p = dsub.add_parser("pay", help="pay an address from the dev wallet")
    p.add_argument("address", metavar="ADDRESS", help="usually an integrated address")
    p.add_argument("amount", metavar="AMOUNT_XMR", help="decimal XMR, like 1.5")
    m = dsub.add_parser("mine", help="mine blocks (confirms payments)")
    m.add_argument("blocks", metavar="N", type=int, help="number of blocks")


def _err(message: str) -> None:
    print(f"anon-ticket: {message}", file=sys.stderr)


def run_dev(data_dir: Path, args: argparse.Namespace) -> int:
    """Run `dev pay` or `dev mine`; 0 ok, 1 no chain or the call failed, 2 bad arguments."""
    import trio

    info_path = Path(data_dir) / DEVCHAIN_DIR / INFO_FILE
    try:
        if args.dev_cmd == "pay":
            amount = xmr_to_atomic(args.amount)
        elif args.dev_cmd == "mine":
            if not 1 <= args.blocks <= MAX_BLOCKS:
                raise InvalidInput(f"number of blocks must be 1..{MAX_BLOCKS}")
        else:
            raise InvalidInput(f"unknown dev command {args.dev_cmd!r}")
    except InvalidInput as exc:
        _err(str(exc))
        return 2
    try:
        info = DevChainInfo.from_file(info_path)
    except FileNotFoundError:
        _err(f"no dev chain is running for data dir {data_dir} (no {info_path}); start one "
             f"with: anon-ticket --data-dir {data_dir} serve --dev-chain")
        return 1
    except (OSError, ValueError) as exc:
        _err(f"cannot read {info_path}: {exc}")
        return 1
    try:
        if args.dev_cmd == "pay":
            txid = trio.run(pay, info, args.address, amount)
            print(txid)
            print(f"sent {args.amount} XMR; confirm it with: anon-ticket "
                  f"--data-dir {data_dir} dev mine 10", file=sys.stderr)
        else:
            print(trio.run(mine, info, args.blocks))
    except RpcUnavailable as exc:
        _err(f"the dev chain does not answer ({exc}); is `serve --dev-chain` still running?")
        return 1
    except (RpcError, InvalidInput) as exc:
        _err(str(exc))
        return 1
    return 0
