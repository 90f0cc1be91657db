"""`rnc chat`: a terminal chat with a checkpoint, using the Engine directly (no Ray, no HTTP).

Tokens are printed as they are generated; on a colour terminal each is shaded by the recurrences it used (darker =
more), like the web page. Commands: `/r N` sets recurrences per token, `/exit X` the adaptive-exit threshold (of the
current criterion), `/exit kl:5e-4` a whole exit rule, `/exit off` turns it off, `/reset` clears the conversation,
`/quit` (or EOF) leaves.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from recursive_model.recurrence import EXIT_CRITERIA, DecodeSettings, ExitRule

from .generation import TokenDecoder
from .loading import LoadedModel

# 256-colour greys from light to dark: index into it by r / r_scale.
_SHADES = [255, 253, 251, 249, 247, 245, 243, 241]
_HELP = "/r N, /exit X|criterion:X|off, /reset, /quit"


@dataclass
class ChatSettings:
    """Generation settings of a chat session; `/r` and `/exit` change `decode` between turns."""

    decode: DecodeSettings  # r, KV strategy, exit rule, warm start (`rnc chat`: the checkpoint's, changed by flags)
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50


def run_chat(
    loaded: LoadedModel,
    settings: ChatSettings,
    input_fn: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    shade: bool | None = None,
) -> int:
    """Interactive loop until /quit or EOF; returns the exit code."""
    engine, tokenizer, cfg = loaded.engine, loaded.tokenizer, loaded.config
    shade = out.isatty() if shade is None else shade
    messages: list[dict[str, str]] = []
    out.write(
        f"loaded {loaded.path} ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M params, "
        f"context {cfg.sequence_len}); decode {settings.decode.label}; {_HELP}\n"
    )
    while True:
        try:
            line = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if _command(line, settings, messages, out):
                return 0
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
        while len(ids) >= cfg.sequence_len and len(messages) > 1:
            del messages[:2]  # forget the oldest exchange so the prompt fits the context
            ids = tokenizer.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
        if len(ids) >= cfg.sequence_len:
            out.write(f"(message too long: {len(ids)} tokens, context {cfg.sequence_len})\n")
            messages.pop()
            continue
        out.write("bot> ")
        decoder, pieces, recurs, t0 = TokenDecoder(tokenizer), [], [], time.perf_counter()
        r_scale = max(cfg.recurrence.r_max, settings.decode.num_recur)
        for step in engine.generate(
            [ids],
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            seed=int(t0 * 1000) % (2**31),
            decode=settings.decode,
        ):
            ts = step[0]
            if ts is None or ts.token in engine.stop_ids:
                break
            piece = decoder.piece(ts.token)
            pieces.append(piece)
            recurs.append(ts.num_recur)
            out.write(_shaded(piece, ts.num_recur, r_scale) if shade else piece)
            out.flush()
        pieces.append(decoder.flush())
        secs = time.perf_counter() - t0
        mean_r = sum(recurs) / len(recurs) if recurs else 0.0
        out.write(f"\n  [{len(recurs)} tokens, mean r {mean_r:.2f}, {len(recurs) / max(secs, 1e-9):.1f} tok/s]\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})


def _shaded(piece: str, r: int, r_scale: int) -> str:
    idx = min(len(_SHADES) - 1, int((r / max(r_scale, 1)) * (len(_SHADES) - 1)))
    fg = 16 if idx < 5 else 255
    return f"\x1b[48;5;{_SHADES[idx]}m\x1b[38;5;{fg}m{piece}\x1b[0m"


def _command(line: str, settings: ChatSettings, messages: list[dict[str, str]], out: TextIO) -> bool:
    """Apply a /command; True means quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if cmd in ("/quit", "/q"):
            return True
        if cmd == "/reset":
            messages.clear()
            out.write("(conversation cleared)\n")
        elif cmd == "/r":
            settings.decode = settings.decode.replace(num_recur=int(arg))
            out.write(f"(decode {settings.decode.label})\n")
        elif cmd == "/exit":
            settings.decode = settings.decode.replace(exit=_exit_rule(arg, settings.decode.exit))
            out.write(f"(decode {settings.decode.label})\n")
        else:
            out.write(f"(commands: {_HELP})\n")
    except ValueError as exc:
        out.write(f"({cmd}: {exc})\n")
    return False


def _exit_rule(arg: str, current: ExitRule | None) -> ExitRule | None:
    """'/exit off' -> None; '/exit kl:5e-4' -> that rule; '/exit 1e-3' -> the current criterion at that threshold."""
    if arg in ("", "off"):
        return None
    if ":" in arg:
        return ExitRule.parse(arg)
    criterion = current.criterion if current is not None else next(iter(EXIT_CRITERIA))
    min_recur = current.min_recur if current is not None else 1
    return ExitRule(criterion=criterion, threshold=float(arg), min_recur=min_recur)
