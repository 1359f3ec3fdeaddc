"""`python -m agent.collector collector|flows ...`: the collector commands without the rest of the agent."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent.collector.cli import add_commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.collector", description="aimesh flow collector")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
