"""The interactive chat loop: the history, the /commands, Ctrl-C to cancel a reply, a clean exit on Ctrl-D."""

from __future__ import annotations

import concurrent.futures
import queue
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from bbsmall_jax import startup_cache
from bbsmall_jax.cli.responder import Responder

COMMANDS = {"/help": "list these commands", "/reset": "start a new conversation",
            "/quit": "leave (also /exit, Ctrl-D; Ctrl-C at the prompt)"}
HELP = "Type a message and press Enter (Ctrl-C cancels a reply). /help lists the commands."
COMPILING = "(compiling the model for this input size; later replies are fast)"


class ChatSession:
    """A conversation: the turns so far (user and bot alternating) and the responder that answers."""

    def __init__(self, responder: Responder):
        self.responder = responder
        self.history: list[str] = []

    def reset(self) -> None:
        self.history = []

    def answer(self, message: str) -> str:
        """The bot's reply to `message` after the history (truncated from the left by the responder)."""
        message = message.strip()
        if not message:
            raise ValueError("empty message")
        return self.responder.reply([self.history + [message]])[0]

    def record(self, message: str, reply: str) -> None:
        """Add a message and its reply to the history."""
        self.history += [message.strip(), reply]

    def send(self, message: str) -> str:
        """The bot's reply to `message`; both join the history."""
        reply = self.answer(message)
        self.record(message, reply)
        return reply


class _Worker:
    """One daemon thread that runs calls in order, so that the main thread waits for a reply in a way Ctrl-C
    interrupts at once (a reply left behind finishes in the background and is dropped)."""

    def __init__(self):
        self._calls: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="chat-reply").start()

    def _run(self) -> None:
        while True:
            future, call = self._calls.get()
            try:
                future.set_result(call())
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(err)
            finally:
                self._calls.task_done()

    def submit(self, call: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, call))
        return future

    def wait_idle(self) -> None:
        """Wait until every submitted call has finished (a reply cancelled just before leaving)."""
        self._calls.join()


def _command_help() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())


def run_repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr) -> int:
    """Read messages line by line until /quit or end of input; returns the exit status.

    A line starting with / is a command (// sends a message that starts with /). Ctrl-C while a reply is being
    made drops that reply and keeps the conversation; at the prompt it leaves.
    """
    interactive = stdin.isatty()
    worker = _Worker()
    compiled: list[bool] = []
    print(HELP, file=stderr)

    def compiling() -> None:
        compiled.append(True)
        print(COMPILING, file=stderr, flush=True)

    try:
        with startup_cache.compile_listener(compiling):
            while True:
                if interactive:
                    stdout.write("you> ")
                    stdout.flush()
                line = stdin.readline()
                if not line:
                    if interactive:
                        stdout.write("\n")  # Ctrl-D: end the prompt's line
                    break
                message = line.strip()
                if message.startswith("/") and not message.startswith("//"):
                    command = message.split()[0].lower()
                    if command in ("/quit", "/exit"):
                        break
                    if command == "/reset":
                        session.reset()
                        print("(conversation reset)", file=stdout, flush=True)
                    elif command == "/help":
                        print(_command_help(), file=stdout, flush=True)
                    else:
                        print(f"(unknown command {command}: /help lists the commands; start a message with // to "
                              "send one that begins with /)", file=stderr, flush=True)
                    continue
                message = message[1:] if message.startswith("//") else message
                if not message:
                    print("(empty message ignored)", file=stderr, flush=True)
                    continue
                reply = _wait_for_reply(worker, session, message, compiled, stderr)
                if reply is not None:
                    print(f"bot> {reply}", file=stdout, flush=True)
    except KeyboardInterrupt:  # at the prompt
        print("", file=stdout)
    try:
        worker.wait_idle()  # a cancelled reply still running: let it end before the interpreter does
    except KeyboardInterrupt:
        pass
    return 0


def _result(future: concurrent.futures.Future):
    """`future`'s result, waited for in short steps: the OS may hand Ctrl-C to another thread, which leaves a
    plain wait blocked until the reply ends, and the main thread only raises KeyboardInterrupt once it wakes."""
    while True:
        try:
            return future.result(timeout=0.05)
        except concurrent.futures.TimeoutError:
            continue


def _wait_for_reply(worker: _Worker, session: ChatSession, message: str, compiled: list,
                    stderr: TextIO) -> Optional[str]:
    """The reply to `message`, recorded in the history; None when Ctrl-C cancels it."""
    start = time.perf_counter()
    compiled.clear()
    future = worker.submit(lambda: session.answer(message))
    try:
        reply = _result(future)
    except KeyboardInterrupt:
        print("(reply cancelled)", file=stderr, flush=True)
        return None
    session.record(message, reply)
    if compiled:
        print(f"({time.perf_counter() - start:.1f} s)", file=stderr, flush=True)
    return reply
