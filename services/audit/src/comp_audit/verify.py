"""``python -m comp_audit.verify DIR``: verify an audit data dir offline, with nothing but
the files (the records, the checkpoints and the public key beside them); no NATS.

Exit status 0 when the log verifies, 1 naming the first problem, 2 when DIR holds no log.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .store import StoreError, verify_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comp_audit.verify", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="the audit service's data dir (COMP_AUDIT__DATA_DIR)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    try:
        verdict = verify_dir(args.data_dir)
    except (StoreError, OSError, ValueError) as exc:
        print(f"cannot verify {args.data_dir}: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(verdict.to_json(), indent=2))
    elif verdict.ok:
        print(f"ok: {verdict.records} records, head {verdict.head.seq} {verdict.head.hash}, {verdict.checkpoints} signed checkpoints")
    else:
        print(f"FAILED: {verdict.problem}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
