"""What a warm start reuses from disk: compiled generation programs and the model's param shapes.

JAX's own persistent cache skips XLA's compilation, but every process still traces and lowers each program
to find its cache key (seconds for a generation program). Here the key is computed without tracing, from the
model and generation code, the JAX build and devices, the program's static settings and the shapes of its
arguments, and the executable is serialized, so a second run only loads it. The cache is off unless a command turns it on
(`enabled`), since a test that counts compilations must see them happen.

Loading an executable runs code from the cache directory: it is as trusted as the user's own files (JAX's
cache is too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
from typing import Any, Callable, Iterator, Optional

DEFAULT_DIR = os.path.join("~", ".cache", "bbsmall_jax", "xla")
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
PROGRAM_CODE = ("nn", "generation")  # the subpackages generation programs and param shapes are made from
_FRESH = {"xla_embed_ir_in_executable": False}  # XLA's default: changes no code, only JAX's in-memory cache key


@dataclasses.dataclass
class _StartupCache:
    """The process's startup cache: the project's one module-level mutable state, since a compiled program
    belongs to the process (its backend and devices), not to any one model or command."""

    directory: Optional[str] = None  # where executables and values are kept; None: the cache is off
    loaded: dict = dataclasses.field(default_factory=dict)  # key -> executable, loaded or compiled this run
    listeners: list[Callable[[], None]] = dataclasses.field(default_factory=list)  # see `compile_listener`


_CACHE = _StartupCache()


def cache_dir(directory: Optional[str] = None) -> str:
    """Where compilations persist: `directory`, else `BBSMALL_CACHE_DIR`, else ~/.cache/bbsmall_jax/xla."""
    return os.path.expanduser(directory or os.environ.get("BBSMALL_CACHE_DIR", DEFAULT_DIR))


@contextlib.contextmanager
def enabled(directory: Optional[str] = None) -> Iterator[str]:
    """Use (and fill) the cache in `cache_dir(directory)`/startup while the block runs."""
    path = os.path.join(cache_dir(directory), "startup")
    previous = (_CACHE.directory, _CACHE.loaded)
    _CACHE.directory, _CACHE.loaded = path, {}
    try:
        yield path
    finally:
        _CACHE.directory, _CACHE.loaded = previous


@contextlib.contextmanager
def compile_listener(listener: Callable[[], None]) -> Iterator[None]:
    """Call `listener()` (from the compiling thread) before each generation program compiles while the block
    runs: not when an executable is loaded or already in memory. Programs run outside the cache (several
    devices, or the cache off) compile inside jit, unannounced."""
    _CACHE.listeners.append(listener)
    try:
        yield
    finally:
        _CACHE.listeners.remove(listener)


@functools.lru_cache(maxsize=None)
def fingerprint() -> str:
    """A hash of what compiled code depends on besides its inputs: the code programs are built from (the
    model and generation subpackages, this file), the JAX build and flags, the backend's devices."""
    import importlib.metadata

    import jax

    digest = hashlib.sha256()
    paths = [os.path.join(_PACKAGE, "startup_cache.py")]
    for subpackage in PROGRAM_CODE:
        for root, dirs, files in os.walk(os.path.join(_PACKAGE, subpackage)):
            dirs.sort()
            paths += [os.path.join(root, name) for name in sorted(files) if name.endswith((".py", ".so", ".cc"))]
    for path in paths:
        digest.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    devices = jax.devices()
    environment = (jax.__version__, importlib.metadata.version("jaxlib"), jax.default_backend(),
                   tuple(d.device_kind for d in devices), os.environ.get("XLA_FLAGS", ""),
                   jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision),
                   str(jax.config.jax_default_prng_impl))
    digest.update(repr(environment).encode())
    return digest.hexdigest()


def _path(kind: str, key: Any) -> Optional[str]:
    directory = _CACHE.directory
    if directory is None:
        return None
    name = hashlib.sha256(repr((fingerprint(), kind, key)).encode()).hexdigest()[:40]
    return os.path.join(directory, f"{kind}-{name}.pkl")


def _read(path: str) -> Any:
    """The value stored at `path`, or None (missing, cut short or unreadable: recomputed and rewritten)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # noqa: BLE001 - any damage to a cache file means a miss
        return None


def _write(path: str, value: Any) -> None:
    """Store `value` at `path` (written atomically; a failure only costs the cache)."""
    from bbsmall_jax.atomic import write_atomic

    with contextlib.suppress(Exception):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def remember(kind: str, key: Any, compute: Callable[[], Any]) -> Any:
    """`compute()`, kept on disk under (kind, key) while the cache is enabled; `key` is plain data."""
    path = _path(kind, key)
    if path is None:
        return compute()
    value = _read(path)
    if value is None:
        value = compute()
        _write(path, value)
    return value


def _argument_key(args: tuple) -> tuple:
    """The structure, shapes, dtypes, weak types and placement of a program's arguments."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(args)
    return str(tree), tuple((str(jax.typeof(leaf)), str(getattr(leaf, "sharding", None))) for leaf in leaves)


def run_program(program, args: tuple, static: dict, identity: Any):
    """`program(*args, **static)` (a jitted function); with the cache enabled, in one process on one device,
    through an executable kept in memory and on disk under `identity` (what the program is made from), the
    static arguments and the arguments' shapes, compiled only when neither has it."""
    import jax

    if _CACHE.directory is None or static.get("mesh") is not None or jax.process_count() > 1:
        return program(*args, **static)
    key = (identity, tuple(sorted((name, repr(value)) for name, value in static.items())), _argument_key(args))
    compiled = _CACHE.loaded.get(key)
    if compiled is not None:
        return compiled(*args)
    compiled = _load(key)
    if compiled is not None:
        try:
            outputs = jax.block_until_ready(compiled(*args))
            _CACHE.loaded[key] = compiled
            return outputs
        except Exception:  # noqa: BLE001 - an executable that loads but cannot run: compile it again
            pass
    try:
        compiled = _compile(program, args, static, key)
    except Exception:  # noqa: BLE001 - a backend refusing the option, say: jit as usual (a real error recurs)
        return program(*args, **static)
    _CACHE.loaded[key] = compiled
    return compiled(*args)


def _load(key):
    """The executable stored under `key`, deserialized, or None."""
    from jax.experimental import serialize_executable

    stored = _read(_path("program", key))
    if stored is None:
        return None
    try:
        return serialize_executable.deserialize_and_load(*stored)
    except Exception:  # noqa: BLE001 - e.g. written by another build: compile again
        return None


def _no_persistent_cache_entry() -> contextlib.AbstractContextManager:
    """JAX's persistent cache writes no entry for what this thread compiles while the block runs: its threshold
    on compile time raised through the option's own context manager, which holds for the calling thread only
    (other threads' compilations and the process-wide setting are untouched)."""
    from jax._src import config  # the option's thread-local context manager has no public name

    return config.persistent_cache_min_compile_time_secs(float("inf"))


def _compile(program, args: tuple, static: dict, key):
    """Compile `program` for these arguments and store the executable.

    The executable must be a fresh compilation: one that JAX's persistent cache returned has been deserialized
    once, and serialized again it can lose functions (XLA's CPU client then fails at run time with "Function
    ... not found"). A compiler option at its default value gives the program a key of its own, under which
    JAX neither holds an executable in memory nor, since it writes none for it, on disk.
    """
    from jax.experimental import serialize_executable

    for listener in list(_CACHE.listeners):
        listener()
    with _no_persistent_cache_entry():
        compiled = program.lower(*args, **static).compile(_FRESH)
    try:
        stored = serialize_executable.serialize(compiled)
    except Exception:  # noqa: BLE001 - not every executable serializes; it still runs
        return compiled
    _write(_path("program", key), stored)
    return compiled
