"""Test utilities: random-weight transformers reference models, training fixtures, loopback addresses.

The reference models need the `test` extra (torch, transformers); nothing in the package imports them.
"""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_coordinator() -> "str | None":
    """A coordinator address on loopback for multi-process tests, or None where this host's name is not a
    loopback address (CPU collectives bind to it, and their traffic would leave loopback)."""
    import socket

    if not socket.gethostbyname(socket.gethostname()).startswith("127."):
        return None
    return f"127.0.0.1:{free_loopback_port()}"
