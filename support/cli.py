"""The command line's building blocks: argument types that check ranges with a message naming
them, and `run`, which runs a command and turns a UserError into one line. Each command writes its
own flags where it is defined (persona_vectors.build_parser, apps/*.py's add_commands, train.py).

The mechanism every command goes through (docs/errors.md, "What every command checks"):
- a number takes its type from `bounded(NAME)`: the range in support/limits.LIMITS;
- a path the command writes or reads is declared with a path type (OUTPUT_FILE, OUTPUT_DIR,
  APPEND_FILE, TEXT_FILE, INPUT_FILE), and `parse` checks every one of them before the command
  runs: outputs through support.files.check_output (or check_output_dir), text inputs through
  support.files.check_text, the one reader's check.
tests/test_edges_mechanism.py walks every parser and fails on a flag declared without them."""

import argparse
import math
import sys
from pathlib import Path

import torch

from support import UserError, files, limits
from support.checkpoint import DTYPES
from support.files import made_dirs


def number(kind, least=None, most=None, strict_least=False):
    """An argparse type: int or float within bounds, with a message that names the allowed range."""

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, not {text!r}"
            ) from None
        if isinstance(x, float) and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
        if least is not None and (x <= least if strict_least else x < least):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict_least else '>='} {least}, not {text}"
            )
        if most is not None and x > most:
            raise argparse.ArgumentTypeError(f"must be <= {most}, not {text}")
        return x

    return parse


def bounded(name: str):
    """The argparse type of a number whose range is the row `name` of support/limits.LIMITS."""
    least, most, strict = limits.LIMITS[name]
    kind = int if isinstance(least, int) and isinstance(most, int) else float
    parse = number(kind, least, most, strict_least=strict)
    parse.limit = name  # what tests/test_edges_mechanism.py looks for
    return parse


COUNT, LAYER, SCORE = bounded("count"), bounded("layer"), bounded("score")
TEMPERATURE, TOP_P = bounded("temperature"), bounded("top_p")
SEED, MAX_NEW_TOKENS, COEF = bounded("seed"), bounded("max_new_tokens"), bounded("coef")


class PathType:
    """The argparse type of a path a command writes or reads: `kind` says which (one of KINDS),
    and `parse` checks the value accordingly before the command runs. At parse time only the
    name is checked: no component longer than a file name may be (NAME_BYTES)."""

    KINDS = ("output file", "output folder", "appended file", "text file", "input file")

    def __init__(self, kind: str):
        assert kind in self.KINDS, kind
        self.kind = self.__name__ = kind

    def __call__(self, text: str) -> str:
        for part in Path(text).parts:
            if len(part.encode("utf-8", "surrogateescape")) > limits.NAME_BYTES:
                raise argparse.ArgumentTypeError(
                    f"a name in {text[:40]}... is longer than {limits.NAME_BYTES} bytes: shorten it"
                )
        return text

    def __repr__(self) -> str:
        return f"PathType({self.kind!r})"


OUTPUT_FILE = PathType("output file")  # exists: --force; an input of this run: never
OUTPUT_DIR = PathType("output folder")  # a run's folder (resumable): may exist, must be a folder
APPEND_FILE = PathType("appended file")  # added to (chat --save): may exist, never an input
TEXT_FILE = PathType("text file")  # UTF-8, checked whole (support.files.check_text)
INPUT_FILE = PathType("input file")  # read as bytes (.gguf, .pt): must exist


def _actions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """The actions of the (sub)command that `args` ran: the parser's, and its subparser's."""
    actions = list(parser._actions)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            chosen = a.choices.get(getattr(args, a.dest, None))
            actions += _actions(chosen, args) if chosen else []
    return actions


def _values(args, action) -> list[str]:
    value = getattr(args, action.dest, None)
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Every path flag of the command `args` ran, checked before any work: text inputs by the one
    reader's check (files.check_text); outputs by files.check_output (an existing file needs
    --force, an input of this run is never written over) or check_output_dir; appended files are
    never an input either."""
    paths = [
        (a, a.option_strings[-1] if a.option_strings else (a.metavar or a.dest).upper())
        for a in _actions(parser, args)
        if isinstance(a.type, PathType)
    ]
    inputs = []
    for action, option in paths:
        for value in _values(args, action):
            if action.type.kind == "text file":
                files.check_text(value, option)
            if action.type.kind in ("text file", "input file"):
                inputs.append(value)
    force = bool(getattr(args, "force", False))
    for action, option in paths:
        for value in _values(args, action):
            if action.type.kind == "output file":
                files.check_output(Path(value), force, inputs, option)
            elif action.type.kind == "appended file":
                files.check_output(Path(value), True, inputs, option)
            elif action.type.kind == "output folder":
                files.check_output_dir(Path(value), inputs, option)
    return args


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def listed(item):
    """An argparse type: comma-separated values, each parsed by `item` (and within its limit)."""

    def parse(text: str) -> list:
        return [item(v) for v in text.split(",")]

    parse.limit = getattr(item, "limit", None)
    return parse


def layer_or_sweep(text: str) -> int | str:
    """An argparse type for --layer: a block (>= 1), or "sweep": the best layer of the trait's last
    `sweep` (support.files.sweep_layer)."""
    return text if text == "sweep" else LAYER(text)


layer_or_sweep.limit = "layer"


def run(call) -> int:
    """Run a command -> its exit status: a UserError is one line on stderr (1), Ctrl-C is 130; a
    returned path is printed on stdout. A failed command leaves no empty folder behind
    (files.made_dirs)."""
    try:
        with made_dirs():
            result = call()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(result, (Path, str)):
        print(result)
    return 0
