"""Every length and numeric limit of the command line in one table: the ranges of the numbers each
flag takes (support.cli.bounded makes the argparse type from a row), and the lengths of what the
commands read and write (support.files). tests/test_edges_mechanism.py checks that every numeric
flag of every command takes its type from here."""

import math
import sys

BIG = sys.float_info.max  # a float row bounded by this only refuses inf and nan

# name -> (least, most, least is excluded); a whole number when both bounds are ints
LIMITS = {
    "count": (1, 10**9, False),  # questions, samples, rollouts, batch sizes, n, k, ...
    "layer": (1, 10**4, False),  # a block: the model's own count is checked once it is loaded
    "hidden_index": (0, 10**4, False),  # a vector row: 0 = the embeddings (refused where unfit)
    "score": (0, 100, False),  # judge scores and their thresholds
    "temperature": (0.0, 100.0, False),
    "top_p": (0.0, 1.0, True),
    "seed": (0, 2**63 - 1, False),  # what torch.manual_seed takes without overflowing
    "max_new_tokens": (1, 2**20, False),  # static bound; the model's context is checked once loaded
    "max_tokens": (1, 2**20, False),  # a whole sample (prompt + response) read by flag
    "max_seq_len": (2, 2**20, False),  # train.py: a prompt token and a trained one
    "steps": (0, 10**9, False),  # epochs, optimizer steps, warmup
    "coef": (-BIG, BIG, False),  # steering coefficients: finite; float32's range is checked at use
    "learning_rate": (0.0, BIG, True),  # positive and finite; divergence is caught while training
    "weight_decay": (0.0, 1.0, False),
    "port": (0, 65535, False),
    "seconds": (0.0, 3600.0, False),
    "bytes": (1, 2**40, False),
}

NAME_BYTES = 255  # a file or folder name (ext4, APFS, NTFS); longer: "File name too long"
LABEL_BYTES = 100  # the part of an output name built from arguments; longer: cut, and a hash
TEXT_FILE_BYTES = 256 * 2**20  # a text file read whole (prompts, questions); JSONL is streamed


def out_of_range(x: float, name: str) -> str | None:
    """What is wrong with the number x as a value of the row `name` of LIMITS, or None: the one
    range check, behind the command line's types (support.cli.bounded) and train's keywords."""
    least, most, strict = LIMITS[name]
    if isinstance(least, int) and isinstance(most, int) and not isinstance(x, int):
        return "must be a whole number"
    if not math.isfinite(x):
        return "must be a finite number"
    if x <= least if strict else x < least:
        return f"must be {'>' if strict else '>='} {least}"
    if x > most:
        return f"must be <= {most}"
    return None
