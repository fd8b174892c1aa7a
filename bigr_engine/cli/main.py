"""The `bigr` command: one module per command group (generate, train, apps, sample_many), shared flags in common.

Every user error is one line on stderr ("error: ...", naming the problem and the fix) and exit status 2;
outputs are written only after all work succeeded, through temporary files renamed into place.
"""
from __future__ import annotations

import sys

from bigr_engine.cli import apps, export, generate, sample_many, train
from bigr_engine.cli.common import Parser, one_line
from bigr_engine.errors import BigrError


def build_parser() -> Parser:
    ap = Parser(prog="bigr", description="bigr-engine: BiGR image generation on binary latent codes")
    sub = ap.add_subparsers(dest="command", required=True)
    for group in (generate, train, apps, sample_many, export):
        group.register(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # -h (status 0) or a usage error, already printed as one "error: ..." line
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except BigrError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the user named cannot be read or written
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot access{where}: {e.strerror or e}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
