"""The `bigr` command: one module per command group (generate, train, apps, sample_many), shared flags in common.

Every user error is one line on stderr ("error: ...", naming the problem and the fix) and exit status 2;
outputs are written only after all work succeeded, through temporary files renamed into place.
"""
from __future__ import annotations

import sys

from bigr_engine.cli import apps, export, generate, sample_many, serve, train
from bigr_engine.cli.common import Parser, one_line
from bigr_engine.errors import BigrError


THREADS_HELP = ("CPU threads for torch's matmuls (default: torch's, one per core). On an idle 2-core machine 2 threads "
                "generate about 2x faster than 1; on a busy one, 1 thread avoids stalls (6x slower with 2 was seen)")


def _leaf_parsers(parser):
    """Every parser that runs a command (subcommands of subcommands included)."""
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def build_parser() -> Parser:
    ap = Parser(prog="bigr", description="bigr-engine: BiGR image generation on binary latent codes")
    sub = ap.add_subparsers(dest="command", required=True)
    for group in (generate, train, apps, sample_many, export, serve):
        group.register(sub)
    for leaf in _leaf_parsers(ap):
        leaf.add_argument("--threads", type=_threads, help=THREADS_HELP)
    return ap


def _threads(text: str) -> int:
    import argparse
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # -h (status 0) or a usage error, already printed as one "error: ..." line
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
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
