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
import sys
from pathlib import Path

import torch

from support import UserError, files, limits
from support.checkpoint import DTYPES
from support.files import made_dirs


def bounded(name: str):
    """The argparse type of a number whose range is the row `name` of support/limits.LIMITS (a
    whole number when both bounds are), with a message that names the range."""
    least, most, _ = limits.LIMITS[name]
    kind = int if isinstance(least, int) and isinstance(most, int) else float

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, not {text!r}"
            ) from None
        problem = limits.out_of_range(x, name)  # inf and nan included
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, not {text}")
        return x

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


def layers(text: str) -> list[int]:
    """An argparse type for --layers: blocks, comma-separated, where A-B stands for every block
    from A to B ("8,16-19" -> 8, 16, 17, 18, 19); each once, in the order given."""
    out = []
    for part in text.split(","):
        low, dash, high = part.partition("-")
        if not dash:
            out.append(LAYER(part))
            continue
        a, b = LAYER(low), LAYER(high)
        if b < a:
            raise argparse.ArgumentTypeError(f"the range {part} runs backwards: write {b}-{a}")
        out += range(a, b + 1)
    return list(dict.fromkeys(out))


layers.limit = "layer"


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


# Help texts of flags that several commands have, and the flags of the options every pipeline
# passes on to persona_vectors.open_run (or load_checked): the same names, the same meaning.
HELP = {
    "model": "hub id or local directory (default: %(default)s)",
    "device": "cuda, cpu, ... (default: cuda when present)",
    "dtype": "float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)",
    "judge": "openai[:MODEL] | local:MODEL | none (default: openai when OPENAI_API_KEY is set, "
    "else none)",
    "judge_workers": "concurrent judge requests (default: $PERSONA_JUDGE_WORKERS, else 8); lower "
    "it when the server answers 429",
    "max_new_tokens": "default: 1000 on CUDA, 96 on CPU",
    "batch_size": "default: 64 on CUDA, 40 on CPU",
    "temperature": "0 = greedy; default: 1.0 (0.7 for models under 1B on CPU)",
    "top_p": "default: 1.0 (0.9 for models under 1B on CPU)",
    "trait": "a trait in data/traits, or a trait .json file",
    "questions": "how many of the trait's 20 questions",
    "out": "output directory (default: vectors/<model name>/)",
    "vectors": "directory of vector files (default: vectors/<model name>/)",
    "steer": "TRAIT:COEF or FILE.safetensors:COEF, raw or relative to the residual norm (0.1r); "
    "repeatable; negative coefficients mitigate",
    "layer": "a block, or `sweep`: the best layer of the trait's sweep (default: a layer the "
    "vector file records, else the middle)",
    "cap": "bound the activations along the trait from above at the percentile of its "
    "calibrate-cap ceilings (default 90, blocks 16-19 of 30); repeatable; applied after any "
    "--steer",
    "samples": "answers per question (default: 10 on CUDA, 1 on CPU; one answer is greedy unless "
    "--temperature is given)",
    "thinking": "the chat template's thinking mode on (Qwen3); the answer judged, projected and "
    "averaged is the text after </think> (default: off)",
    "kind": "eliciting (--kind trait) or suppressing (--kind normal) system prompts, saved "
    "without them",
}
CAP_SPEC = "TRAIT[:PERCENTILE][@LAYERS]"


def add_device(c, thinking: bool = True) -> None:
    """--device, --dtype and --thinking: how the model is loaded and its chats rendered."""
    c.add_argument("--device", help=HELP["device"])
    c.add_argument("--dtype", type=torch_dtype, help=HELP["dtype"])
    if thinking:
        c.add_argument("--thinking", action="store_true", help=HELP["thinking"])


def add_options(c, sampling: bool = True, judge: bool = True) -> None:
    """The flags of a judged pipeline's `options` (persona_vectors.open_run): the sampling budget
    (--temperature and --top-p only with `sampling`), --judge-workers, the device."""
    c.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, help=HELP["max_new_tokens"])
    c.add_argument("--batch-size", type=COUNT, help=HELP["batch_size"])
    if sampling:
        c.add_argument("--temperature", type=TEMPERATURE, help=HELP["temperature"])
        c.add_argument("--top-p", type=TOP_P, help=HELP["top_p"])
    if judge:
        c.add_argument("--judge-workers", type=COUNT, help=HELP["judge_workers"])
    add_device(c)


def add_steering(c) -> None:
    """--steer, --layer, --positions, --all-layers and --cap (persona_vectors.interventions)."""
    c.add_argument("--steer", action="append", default=[], metavar="TRAIT:COEF", help=HELP["steer"])
    c.add_argument("--layer", type=layer_or_sweep, help=HELP["layer"])
    c.add_argument("--positions", choices=["response", "all", "prompt"], default="response")
    c.add_argument("--all-layers", action="store_true", help="steer every block with v[l] - v[l-1]")
    c.add_argument("--cap", action="append", default=[], metavar=CAP_SPEC, help=HELP["cap"])
