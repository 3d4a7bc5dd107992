"""The interactive chat loop: keeps the history, `/reset` and `/quit`, clean exit on Ctrl-C or end of input."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from bbsmall_jax.cli.responder import Responder

HELP = "Type a message and press Enter. /reset starts a new conversation, /quit (or Ctrl-D) leaves."


class ChatSession:
    """A conversation: the turns so far (user and bot alternating) and the responder that answers."""

    def __init__(self, responder: Responder):
        self.responder = responder
        self.history: list[str] = []

    def reset(self) -> None:
        self.history = []

    def send(self, message: str) -> str:
        """The bot's reply to `message`; both join the history (truncated from the left by the responder)."""
        message = message.strip()
        if not message:
            raise ValueError("empty message")
        reply = self.responder.reply([self.history + [message]])[0]
        self.history += [message, reply]
        return reply


def run_repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr) -> int:
    """Read messages line by line until /quit or end of input; returns the exit status."""
    interactive = stdin.isatty()
    print(HELP, file=stderr)
    first = True
    try:
        while True:
            if interactive:
                stdout.write("you> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            message = line.strip()
            if message in ("/quit", "/exit"):
                break
            if message == "/reset":
                session.reset()
                print("(conversation reset)", file=stdout, flush=True)
                continue
            if not message:
                print("(empty message ignored)", file=stderr, flush=True)
                continue
            if first:
                print("(compiling the model for this input size; later replies are fast)", file=stderr, flush=True)
            start = time.perf_counter()
            reply = session.send(message)
            print(f"bot> {reply}", file=stdout, flush=True)
            if first:
                print(f"({time.perf_counter() - start:.1f} s)", file=stderr, flush=True)
                first = False
    except KeyboardInterrupt:
        print("", file=stdout)
    return 0
