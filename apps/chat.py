"""`chat`: a multi-turn chat with the model, optionally steered or capped, with a gauge per persona
vector after each reply.

    python -m apps chat --steer evil:-1         # type a message; /help lists the commands
    python -m apps chat --cap evil              # capped (docs/capping.md): "capped 3/41 positions"

Each gauge (apps/monitor.py) shows where the last token before the reply and the reply's mean fall
along the trait's unit vector, beside where extraction's pos and neg answers fell.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import persona_vectors as pv
from apps.monitor import Gauge, gauges_for
from support import UserError, cli
from support.files import atomic_write, check_output
from support.hub import DEFAULT_MODEL
from support.sampling import Budget, check_new_tokens

CHAT_HELP = (
    "commands: /steer SPEC [SPEC ...] (replace the steering, e.g. /steer evil:1.5 humorous:-1), "
    "/unsteer,\n"
    "          /cap SPEC [SPEC ...] (replace the caps, e.g. /cap evil:75@12-20), /cap off, "
    "/gauge (the history of gauge readings), /save FILE.jsonl, /reset (forget the conversation), "
    "/help, /quit"
)


def show(g: Gauge, reading: dict) -> str:
    """A gauge's reading as one line: '[evil L15] before reply +3.10 neg -1.00 [---|------] pos
    +5.20   reply ...'"""
    parts = []
    for kind, name in (("prompt_last", "before reply"), ("response_avg", "reply")):
        x, mark = reading[kind], g.marks[kind]
        if mark is None:
            parts.append(f"{name} {x:+.2f}")
            continue
        neg, pos = mark
        # 0 at the neg mean, 1 at the pos mean
        where = (x - neg) / (pos - neg) if pos != neg else 0.5
        cells = 10
        i = min(max(round(where * (cells - 1)), 0), cells - 1)
        bar = "".join("|" if j == i else "-" for j in range(cells))
        parts.append(f"{name} {x:+.2f} neg {neg:+.2f} [{bar}] pos {pos:+.2f}")
    return f"  [{g.trait} L{g.layer}] " + "   ".join(parts)


def chat(
    model: str = DEFAULT_MODEL,
    steer: list[str] = (),
    cap: list[str] = (),
    layer: int | None = None,
    gauge: list[str] | None = None,
    vectors: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    save: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    stdin=None,
    stdout=None,
) -> list[dict]:
    """A multi-turn chat, optionally steered, with a gauge per persona vector after each assistant
    turn.

    Each gauge shows the projection of the last token before the reply (the paper's predictor) and
    of the reply's mean activation onto the trait's unit vector, beside extraction's mean neg and
    pos projections. A steered turn or capped turn is gauged as the plain model reads it, and a
    capped one says how many of its positions (the last prompt token and the reply's tokens) were
    capped. Lines that start with "/" are commands (CHAT_HELP); input may come from a pipe (one user
    turn per line). -> the messages.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    Budget(1, max_new_tokens, temperature, top_p, 1)
    if save:
        check_output(save, force=True, option="--save")  # appended to: an existing file is fine
    specs = pv.parsed(steer, cap)  # --steer and --cap parsed once: checked, then applied
    lm, tok, vectors_dir, _ = pv.load_checked(model, device, dtype, specs[0], vectors, cap=specs[1])
    check_new_tokens(lm, max_new_tokens)  # each turn: its conversation's length, below
    meters = gauges_for(lm, vectors_dir, gauge, layer)
    interventions, caps = pv.interventions(lm, vectors_dir, *specs, layer)
    messages = [{"role": "system", "content": system}] if system else []
    history = []
    interactive = stdin.isatty()

    def say(text=""):
        print(text, file=stdout, flush=True)

    say(
        f"chat with {model}"
        + (f", steering {' '.join(steer)}" if steer else "")
        + (f", capping {' '.join(cap)}" if cap else "")
        + "; /help for commands"
    )
    try:
        while True:
            if interactive:
                print("> ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                cmd, *args = line.split()
                try:
                    if cmd == "/quit":
                        break
                    elif cmd == "/help":
                        say(CHAT_HELP)
                    elif cmd == "/steer":
                        interventions, steer = pv.steering(args, lm, vectors_dir, layer), args
                        say(f"steering: {' '.join(args) or 'off'}")
                    elif cmd == "/unsteer":
                        interventions, steer = [], []
                        say("steering: off")
                    elif cmd == "/cap" and args:
                        new = [] if args == ["off"] else args
                        caps, cap = pv.interventions(lm, vectors_dir, cap=new)[1], new
                        say(f"capping: {' '.join(cap) or 'off'}")
                    elif cmd == "/gauge":
                        for h in history:
                            say(
                                f"turn {h['turn']} {h['trait']}: before reply "
                                f"{h['prompt_last']:+.2f}, reply {h['response_avg']:+.2f}"
                                + (f" (steering {' '.join(h['steer'])})" if h["steer"] else "")
                                + (f" (capping {' '.join(h['cap'])})" if h["cap"] else "")
                            )
                    elif cmd == "/save" and args:
                        save_conversation(Path(args[0]), messages)
                        say(f"saved {args[0]}")
                    elif cmd == "/reset":
                        messages = [{"role": "system", "content": system}] if system else []
                        say("conversation reset")
                    else:
                        say(f"unknown command {line!r}; {CHAT_HELP}")
                except (UserError, OSError) as e:  # a bad command never ends the chat
                    say(f"error: {e}")
                continue
            messages.append({"role": "user", "content": line})
            prompt = tok.encode_chat(messages)
            if len(prompt) + max_new_tokens > lm.config.max_position_embeddings:
                messages.pop()
                context = lm.config.max_position_embeddings
                say(
                    f"error: the conversation is longer than the model's context ({context} "
                    "tokens): /reset it"
                )
                continue
            outs, acts = pv.answer_with_activations(
                lm,
                tok,
                [messages],
                max_new_tokens,
                temperature,
                top_p,
                seed + len(messages),
                interventions,
                caps,
            )
            if interventions or caps:  # gauge the turn as the plain model reads it
                acts = pv.read_answers(lm, [prompt], outs)
            reply = tok.decode(outs[0])
            messages.append({"role": "assistant", "content": reply})
            say(reply)
            if caps:
                say(f"  capped {int(caps[0].fired[0])}/{len(outs[0]) + 1} positions")
            turn = sum(m["role"] == "assistant" for m in messages)
            for g in meters:
                reading = g.read(acts)
                history.append(
                    dict(
                        turn=turn,
                        trait=g.trait,
                        layer=g.layer,
                        steer=list(steer),
                        cap=list(cap),
                        **reading,
                    )
                )
                say(show(g, reading))
    except KeyboardInterrupt:  # Ctrl-C: the conversation is kept, as at the end of input
        if messages and messages[-1]["role"] == "user":
            messages.pop()  # its reply was cut off
        if save and any(m["role"] == "user" for m in messages):
            save_at_end(Path(save), messages)
            print(f"interrupted: the conversation is saved in {save}", file=sys.stderr)
        raise
    if save:
        save_at_end(Path(save), messages)
    return messages


def save_at_end(save: Path, messages: list[dict]) -> None:
    """The conversation appended to --save; when that fails (the folder went away, the disk is full,
    ...) it is kept in a temporary file, which the error names."""
    try:
        save_conversation(save, messages)
    except OSError as e:
        fd, kept = tempfile.mkstemp(prefix="chat-", suffix=".jsonl")
        os.close(fd)
        save_conversation(Path(kept), messages)
        raise UserError(
            f"cannot save the conversation to {save} ({e.strerror}); it is in {kept}"
        ) from None


def save_conversation(path: Path, messages: list[dict]) -> None:
    """Append one JSONL line {"messages": [...]} (the format `monitor` and training read),
    atomically: the file holds the line whole or not at all, even when the save is cut short."""
    path = Path(path)
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"  # a last line left without its end: the new one starts on a line of its own
    line = json.dumps({"messages": messages}) + "\n"
    atomic_write(path, lambda tmp: tmp.write_bytes(old + line.encode("utf-8")))


def add_commands(sub) -> None:
    """Register `chat` on the command line's subparsers (python -m apps)."""
    c = sub.add_parser(
        "chat",
        help="multi-turn chat, optionally steered or capped, with a persona gauge after each reply",
    )
    c.add_argument("--model", default=DEFAULT_MODEL, help=cli.HELP["model"])
    c.add_argument(
        "--steer", action="append", default=[], metavar="TRAIT:COEF", help=cli.HELP["steer"]
    )
    c.add_argument("--cap", action="append", default=[], metavar=cli.CAP_SPEC, help=cli.HELP["cap"])
    c.add_argument(
        "--layer",
        type=cli.layer_or_sweep,
        default=None,
        help="steering and gauge layer: " + cli.HELP["layer"],
    )
    c.add_argument(
        "--gauge",
        action="append",
        default=None,
        metavar="TRAIT",
        help="trait (or vector file) to gauge; repeatable (default: every vector of the model)",
    )
    c.add_argument("--vectors", default=None, help=cli.HELP["vectors"])
    c.add_argument(
        "--system", default=None, help="system prompt (default: the model's own template decides)"
    )
    c.add_argument("--max-new-tokens", type=cli.MAX_NEW_TOKENS, default=200)
    c.add_argument("--temperature", type=cli.TEMPERATURE, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-p", type=cli.TOP_P, default=1.0)
    c.add_argument("--seed", type=cli.SEED, default=0)
    c.add_argument(
        "--save",
        type=cli.APPEND_FILE,
        default=None,
        help="append the conversation to this JSONL file at the end",
    )
    c.add_argument("--device", default=None, help=cli.HELP["device"])
    c.add_argument("--dtype", type=cli.torch_dtype, default=None, help=cli.HELP["dtype"])
    c.set_defaults(
        run=lambda a: chat(
            model=a.model,
            steer=a.steer,
            cap=a.cap,
            layer=a.layer,
            gauge=a.gauge,
            vectors=a.vectors,
            system=a.system,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            seed=a.seed,
            save=a.save,
            device=a.device,
            dtype=a.dtype,
        )
    )
