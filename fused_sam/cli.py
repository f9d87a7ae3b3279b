"""The fused-sam command.

  check   holds every backend on this machine to the reference backend (run it after installing)
  bench   how much faster the fused SAM step is here than classic SAM, and whether it is right
  demo    SAM against gradient descent on synthetic problems
  study   how much of SAM's benefit the cheaper variants keep, and what they cost
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

COMMANDS = ("check", "bench", "demo", "study")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fused-sam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="what to run; fused-sam COMMAND -h for its options")
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
