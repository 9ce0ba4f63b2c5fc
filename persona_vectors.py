"""persona-vectors: extract, steer and monitor character traits in a chat model's residual stream.

    python persona_vectors.py generate "What is the capital of France?"

Every subcommand is a plain function here (import them); the command line only parses arguments.
"""
import argparse
import sys
import time

import torch

import model as M
from hub import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generate(prompts: list[str], model_name: str = DEFAULT_MODEL, system: str | None = None,
             max_new_tokens: int = 200, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             device: str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Answer each prompt as a single-turn chat (greedy unless temperature > 0) -> the answers.

    With system=None the model's own chat template decides (Qwen2.5 and SmolLM2 insert their default system prompt).
    """
    model, tok = M.load(model_name, device, dtype)
    messages = [([{"role": "system", "content": system}] if system is not None else [])
                + [{"role": "user", "content": p}] for p in prompts]
    ids = [tok.encode_chat(m) for m in messages]
    out = M.generate(model, ids, max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                     temperature=temperature, top_p=top_p, seed=seed, progress=True)
    return [tok.decode(o) for o in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="persona_vectors.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local directory (default: %(default)s)")
        sp.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
        sp.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")

    g = sub.add_parser("generate", help="answer prompts with the chat model")
    g.add_argument("prompts", nargs="+", help="one or more user messages")
    g.add_argument("--system", default=None, help="system prompt (default: the model's own template decides)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    common(g)

    args = p.parse_args(argv)
    try:
        if args.command == "generate":
            t0 = time.time()
            answers = generate(args.prompts, args.model, args.system, args.max_new_tokens, args.temperature,
                               args.top_p, args.seed, args.device, DTYPES.get(args.dtype))
            for prompt, answer in zip(args.prompts, answers):
                print(f">>> {prompt}\n{answer}\n")
            print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
