"""The command line's building blocks: argument types that check ranges with a message naming them, and the
options several commands share, as argparse parent parsers (persona_vectors.build_parser and apps/ use them)."""
import argparse
import math

import torch

from support.checkpoint import DTYPES
from support.hub import DEFAULT_MODEL


def number(kind, least=None, most=None, strict_least=False):
    """An argparse type: int or float within bounds, with a message that names the allowed range."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"not {text!r}") from None
        if isinstance(x, float) and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
        if least is not None and (x <= least if strict_least else x < least):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict_least else '>='} {least}, not {text}")
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


def parent(*parents) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False, parents=list(parents))


# Options that several commands share, as parent parsers (apps/ use them too).
DEVICE = parent()
DEVICE.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
DEVICE.add_argument("--dtype", type=torch_dtype, default=None, help="float32, bfloat16 or float16 (default: "
                    "bfloat16 on CUDA, float32 on CPU)")
MODEL = parent(DEVICE)
MODEL.add_argument("--model", dest="model_name", default=DEFAULT_MODEL, help="hub id or local directory (default: "
                   "%(default)s)")
VECTORS = parent()
VECTORS.add_argument("--vectors", default=None, help="directory of vector files (default: vectors/<model name>/)")
SAMPLING = parent()  # the pipelines': defaults that depend on the model and device
SAMPLING.add_argument("--temperature", type=TEMPERATURE, default=None, help="0 = greedy; default: 1.0 (0.7 for "
                      "models under 1B on CPU)")
SAMPLING.add_argument("--top-p", type=TOP_P, default=None, help="default: 1.0 (0.9 for models under 1B on CPU)")
GENERATION = parent()  # every sampling pipeline's judge, budget and seed
GENERATION.add_argument("--judge", default=None, help="openai[:MODEL] | local:MODEL | none (default: openai when "
                        "OPENAI_API_KEY is set, else none)")
GENERATION.add_argument("--max-new-tokens", type=COUNT, default=None, help="default: 1000 on CUDA, 96 on CPU")
GENERATION.add_argument("--batch-size", type=COUNT, default=None, help="default: 64 on CUDA, 40 on CPU")
GENERATION.add_argument("--seed", type=int, default=0)
PIPELINE = parent(GENERATION, MODEL)  # extract, eval, sweep, monitor-experiment
PIPELINE.add_argument("trait", help="a trait in data/traits, or a trait .json file")
PIPELINE.add_argument("--judge-workers", type=COUNT, default=None, help="concurrent judge requests (default: "
                      "$PERSONA_JUDGE_WORKERS, else 8); lower it when the server answers 429")
PIPELINE.add_argument("--questions", type=COUNT, default=20, help="how many of the trait's 20 questions")
PIPELINE.add_argument("--out", default=None, help="output directory (default: vectors/<model name>/)")
STEER = parent(VECTORS)
STEER.add_argument("--steer", action="append", default=[], metavar="TRAIT:COEF", help="TRAIT:COEF or "
                   "FILE.safetensors:COEF, raw or relative to the residual norm (0.1r); repeatable; negative "
                   "coefficients mitigate")
STEER.add_argument("--layer", type=LAYER, default=None, help="block to steer (default: the vector's best layer, "
                   "else the middle)")
STEER.add_argument("--positions", choices=["response", "all", "prompt"], default="response")
STEER.add_argument("--all-layers", action="store_true", help="steer every block with v[l] - v[l-1]")
CAP = parent()  # persona capping (support/capping.py): generate, chat, eval, sweep
CAP.add_argument("--cap", action="append", default=[], metavar="TRAIT[:PERCENTILE][@LAYERS]", help="bound the "
                 "activations along the trait from above at the percentile of its calibrate-cap ceilings (default 90, "
                 "blocks 16-19 of 30); repeatable; applied after any --steer")
CHAT = parent(MODEL)  # generate's and chat's: greedy and short by default
CHAT.add_argument("--max-new-tokens", type=COUNT, default=200)
CHAT.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy (default)")
CHAT.add_argument("--top-p", type=TOP_P, default=1.0)
CHAT.add_argument("--seed", type=int, default=0)
CHAT.add_argument("--system", default=None, help="system prompt (default: the model's own template decides)")
