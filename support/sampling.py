"""The sampling budget of the pipelines: how many answers, how long, how hot, in batches of how
many; the paper's on a GPU, a small one on the CPU. And the hash that names a cached run by its
settings."""

import hashlib
import json
import math
from dataclasses import dataclass

from support import UserError

SMALL_MODEL_TEMPERATURE, SMALL_MODEL_TOP_P = 0.7, 0.9


@dataclass
class Budget:
    """How many answers to sample and how: the paper's budget on a GPU, a small one on the CPU."""

    rollouts: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int

    def __post_init__(self):
        for name in ("rollouts", "max_new_tokens", "batch_size"):
            check_count(name.replace("_", "-"), getattr(self, name))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature must be >= 0 (0 = greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], not {self.top_p}")


def default_budget(device: str, n_params: int) -> Budget:
    if str(device).startswith("cuda"):
        return Budget(rollouts=10, max_new_tokens=1000, temperature=1.0, top_p=1.0, batch_size=64)
    # Small models at temperature 1 often derail into gibberish, and offline no judge removes it;
    # see docs/extract.md ("Sampling defaults for small models") for the measurement behind these
    # numbers.
    small = n_params < 1_000_000_000
    return Budget(
        rollouts=1,
        max_new_tokens=96,
        temperature=SMALL_MODEL_TEMPERATURE if small else 1.0,
        top_p=SMALL_MODEL_TOP_P if small else 1.0,
        batch_size=40,
    )


def budget_for(
    model, rollouts=None, max_new_tokens=None, temperature=None, top_p=None, batch_size=None
) -> Budget:
    """The default budget for this model and device, with any of the user's settings in place of the
    defaults."""
    dev = str(model.model.embed_tokens.weight.device)
    b = default_budget(dev, sum(p.numel() for p in model.parameters()))
    if max_new_tokens is not None:
        check_count("max-new-tokens", max_new_tokens)
    check_new_tokens(model, max_new_tokens or b.max_new_tokens)  # before any work
    return Budget(
        b.rollouts if rollouts is None else rollouts,
        b.max_new_tokens if max_new_tokens is None else max_new_tokens,
        b.temperature if temperature is None else temperature,
        b.top_p if top_p is None else top_p,
        b.batch_size if batch_size is None else batch_size,
    )


def check_new_tokens(model, max_new_tokens: int, prompt_tokens: int = 1) -> int:
    """The one check of --max-new-tokens against the model's context, used by every command once
    the model is loaded (with the longest prompt where it is known, else 1), before any work:
    positions past max_position_embeddings were never trained."""
    n_ctx = model.config.max_position_embeddings
    if prompt_tokens + max_new_tokens > n_ctx:
        plural = "s" if prompt_tokens != 1 else ""
        raise UserError(
            f"--max-new-tokens {max_new_tokens} plus {prompt_tokens} prompt "
            f"token{plural} is beyond this model's context of {n_ctx} tokens: use "
            f"--max-new-tokens {max(1, n_ctx - prompt_tokens)} or less"
            + (" (or a shorter prompt)" if prompt_tokens > 1 else "")
        )
    return max_new_tokens


def check_count(name: str, value: int, least: int = 1) -> int:
    if not isinstance(value, int) or value < least:
        raise UserError(f"--{name} must be a whole number >= {least}, not {value}")
    return value


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]
