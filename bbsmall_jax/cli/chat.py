"""The interactive chat loop: the history, the /commands, Ctrl-C to cancel a reply, a clean exit on Ctrl-D."""

from __future__ import annotations

import concurrent.futures
import queue
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from bbsmall_jax import startup_cache
from bbsmall_jax.errors import UsageError
from bbsmall_jax.generation.prepare import bucket_length
from bbsmall_jax.runtime.responder import Responder

COMMANDS = {"/help": "list these commands", "/reset": "start a new conversation",
            "/quit": "leave (also /exit, Ctrl-D; Ctrl-C at the prompt)"}
HELP = "Type a message and press Enter (Ctrl-C cancels a reply). /help lists the commands."
COMPILING = "(compiling the model for this input size; later replies are fast)"
FINISHING = "(finishing a compile for longer conversations, started in the background)"
NEXT_MESSAGE_TOKENS = 32  # the next message's length, in tokens, up to which its context's program is compiled ahead


class ChatSession:
    """A conversation: the turns so far (user and bot alternating) and the responder that answers.

    With `compile_ahead`, `prepare_next` compiles the programs for the context lengths the next message may
    bring, which `run_repl` does in the background while the user types (off for a responder that does not
    compile, such as a test's stub)."""

    def __init__(self, responder: Responder, compile_ahead: bool = True):
        self.responder, self.compile_ahead = responder, compile_ahead
        self.history: list[str] = []
        self.compiled_buckets: set[int] = set()  # context-length buckets some reply has run in

    def reset(self) -> None:
        self.history = []

    def answer(self, message: str) -> str:
        """The bot's reply to `message` after the history (truncated from the left by the responder)."""
        message = message.strip()
        if not message:
            raise UsageError("empty message")
        reply = self.responder.reply([self.history + [message]])[0]
        if self.compile_ahead:
            self.compiled_buckets.add(self._bucket(len(self.responder.context_ids(self.history + [message]))))
        return reply

    def record(self, message: str, reply: str) -> None:
        """Add a message and its reply to the history."""
        self.history += [message.strip(), reply]

    def send(self, message: str) -> str:
        """The bot's reply to `message`; both join the history."""
        reply = self.answer(message)
        self.record(message, reply)
        return reply

    def _bucket(self, context_length: int) -> int:
        """The length `generate` pads a context of this many tokens to (one program per bucket)."""
        return bucket_length(max(context_length, 1), self.responder.model.config.max_position_embeddings)

    def buckets_ahead(self) -> list[int]:
        """The context buckets a next message of up to NEXT_MESSAGE_TOKENS tokens may need that no reply has run
        in yet."""
        shortest = len(self.responder.context_ids(self.history + ["."]))  # a message of one token
        longest = min(shortest + NEXT_MESSAGE_TOKENS, self.responder.max_context_tokens)
        return sorted({self._bucket(n) for n in range(shortest, longest + 1)} - self.compiled_buckets)

    def prepare_next(self) -> None:
        """Compile the programs of `buckets_ahead`, by one throwaway reply to a filler context in each."""
        for bucket in self.buckets_ahead():
            self.responder.reply_ids([[self.responder.tokenizer.eos_token_id] * bucket])
            self.compiled_buckets.add(bucket)


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

    def submit(self, call: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, call))
        return future


def _command_help() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())


def run_repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr) -> int:
    """Read messages line by line until /quit or end of input; returns the exit status.

    A line starting with / is a command (// sends a message that starts with /). Ctrl-C while a reply is being
    made drops that reply and keeps the conversation; at the prompt it leaves. In a terminal, after each reply
    the session's programs for the next message are compiled in the background while the user types
    (`ChatSession.prepare_next`); leaving does not wait for that.
    """
    interactive = stdin.isatty()
    worker = _Worker()
    compiled: list[bool] = []
    answering = threading.Event()  # set while the worker makes a reply: only its compiles are announced
    background: Optional[concurrent.futures.Future] = None
    replies: list[concurrent.futures.Future] = []  # each reply's call, so that leaving waits for a cancelled one
    print(HELP, file=stderr)

    def compiling() -> None:
        compiled.append(True)
        if answering.is_set():
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
                if background is not None and not background.done():
                    print(FINISHING, file=stderr, flush=True)
                reply = _wait_for_reply(worker, session, message, compiled, answering, stderr, replies)
                if reply is not None:
                    print(f"bot> {reply}", file=stdout, flush=True)
                    if session.compile_ahead and interactive:
                        background = worker.submit(session.prepare_next)
    except KeyboardInterrupt:  # at the prompt
        print("", file=stdout)
    try:
        concurrent.futures.wait(replies)  # a cancelled reply still running: let it end before the interpreter does
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
                    answering: threading.Event, stderr: TextIO, replies: list) -> Optional[str]:
    """The reply to `message`, recorded in the history; None when Ctrl-C cancels it. `answering` is set while
    the worker makes it; its call's future is appended to `replies`."""
    start = time.perf_counter()
    compiled.clear()

    def answer() -> str:
        answering.set()
        try:
            return session.answer(message)
        finally:
            answering.clear()

    future = worker.submit(answer)
    replies.append(future)
    try:
        reply = _result(future)
    except KeyboardInterrupt:
        print("(reply cancelled)", file=stderr, flush=True)
        return None
    session.record(message, reply)
    if compiled:
        print(f"({time.perf_counter() - start:.1f} s)", file=stderr, flush=True)
    return reply
