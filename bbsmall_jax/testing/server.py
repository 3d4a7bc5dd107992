"""`python -m bbsmall_jax serve` in a subprocess on a free loopback port (for tests and bench/serve.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bbsmall_jax.testing import free_loopback_port


class ServerFailed(RuntimeError):
    """The server exited or did not get ready in time; the message ends with its log."""


class ServeProcess:
    """One `bbsmall serve` subprocess, its output in a log file."""

    def __init__(self, flags: list[str], log_path: str):
        self.port, self.log_path = free_loopback_port(), log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "bbsmall_jax", "serve", "--port", str(self.port),
                                         *flags], stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def log(self) -> str:
        """The end of the server's output."""
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def wait_ready(self, timeout: float = 420) -> None:
        """Until /health answers 200 (warm-up done); ServerFailed if the server dies or takes too long."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ServerFailed(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM (the server drains), kill after a minute; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
