"""The applications' command line: python -m apps COMMAND ...
(the method's own commands: python persona_vectors.py COMMAND ...).

Each module here registers its commands with add_commands(sub); each command calls its function.
"""

import argparse
import sys

from apps import capping, chat, control_vector, flagging, monitor, new_trait, server
from support.cli import check_paths, run

MODULES = (monitor, chat, flagging, control_vector, new_trait, server, capping)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apps", description="applications built on persona vectors"
    )
    sub = p.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(lambda: args.run(check_paths(parser, args)))


if __name__ == "__main__":
    sys.exit(main())
