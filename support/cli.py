"""The command line's building blocks: argument types that check ranges with a message naming
them, and `run`, which runs a command and turns a UserError into one line. Each command writes its
own flags where it is defined (persona_vectors.build_parser, apps/*.py's add_commands)."""

import argparse
import math
import sys
from pathlib import Path

import torch

from support import UserError
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


COUNT, LAYER, SCORE = number(int, 1), number(int, 1), number(float, 0, 100)
TEMPERATURE, TOP_P = number(float, 0), number(float, 0, 1, strict_least=True)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def listed(item):
    """An argparse type: comma-separated values, each parsed by `item`."""
    return lambda text: [item(v) for v in text.split(",")]


def layer_or_sweep(text: str) -> int | str:
    """An argparse type for --layer: a block (>= 1), or "sweep": the best layer of the trait's last
    `sweep` (support.files.sweep_layer)."""
    return text if text == "sweep" else LAYER(text)


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
