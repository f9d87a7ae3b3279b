"""The fused-sam command: fused-sam check, fused-sam bench, fused-sam demo and fused-sam study."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fused-sam", description=__doc__)
    parser.add_argument("command", choices=["check", "bench", "demo", "study"],
                        help="what to run; `fused-sam COMMAND -h` for its options")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "check":
        from .check import main as run
    elif args.command == "bench":
        from .bench.cli import main as run
    elif args.command == "demo":
        from .demo.cli import main as run
    else:
        from .study import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
