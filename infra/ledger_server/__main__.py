"""`python -m infra.ledger_server`: the ledger server of $LORALEDGER_HOME on 127.0.0.1, as
`loraledger stack up` starts it in the background (`loraledger ledger serve` is the same in the
foreground)."""

from __future__ import annotations

import sys

from infra.ledger_server.ownership import DirectoryInUse
from infra.ledger_server.server import LedgerServerError, serve
from infra.settings import LEDGER_HOST, load_settings


def main() -> int:
    settings = load_settings()
    try:
        serve(settings.ledger_dir, host=LEDGER_HOST, port=settings.ledger_port,
              password=settings.ledger_password)
    except (DirectoryInUse, LedgerServerError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
