"""Writing files so that a reader never sees half of one, and reading the YAML/JSON mappings a
user hands us with one clear error for every way such a file can be wrong (no imports of autorank:
any layer may use it, the torch-only core included)."""

from __future__ import annotations

import os
import secrets
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "check_output", "creation_lock", "read_mapping", "same_file", "sqlite_path"]

LOCK_TIMEOUT_S = 300  # a worker waits this long for another to finish creating a database schema


def _new_temp(path: Path) -> Path:
    """An empty, new file beside `path`, named .<name>.<random>.tmp<suffix>, created with mode
    0o666 minus the umask, as open() creates files (tempfile.mkstemp would give 0o600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def same_file(a, b) -> bool:
    """Whether two paths name the same file: the same resolved path (links followed), or, both
    existing, the same inode (hard links, bind mounts). A SQLAlchemy/Optuna URL is not a path:
    pass its database file (sqlite:///PATH)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        if pa.resolve() == pb.resolve():
            return True
    except (OSError, RuntimeError):  # a link loop: compare what exists
        pass
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return False


def check_output(path, *, what: str, inputs: dict | None = None, error: type[Exception] = ValueError) -> Path:
    """Before any work: `path` may be written by this tool, or `error(message)` says why not and
    what to do. The one guard every writer of autorank calls (the app's outputs, the export CLI,
    the device runner's --out):
    - never one of its inputs or its storage (`inputs`: role -> path, e.g. {"the study's storage":
      db_file, "the plan file": plan}): writing there would destroy what the run was made from;
    - not a directory; the nearest existing folder above it accepts a new file (tried with a
      temporary file, which is removed: permission bits alone say nothing for root or on a
      read-only mount).
    Returns the path."""
    p = Path(path).expanduser()
    for role, other in (inputs or {}).items():
        if other is not None and str(other) != "" and same_file(p, other):
            raise error(f"{what}={p} is {role}: writing there would destroy it; choose another path for {what}")
    if p.is_dir():
        raise error(f"{what}={p} is a directory: give a file path, e.g. {what}={p / 'plan.yaml'}")
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise error(f"{what}={p} cannot be written: {folder} is a file, not a folder")
    probe = folder / f".autorank-write-test-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise error(f"{what}={p} cannot be written: no file can be created in {folder} "
                    f"({e.strerror or e}); choose a writable path ({what}=...)") from e
    os.close(fd)
    probe.unlink(missing_ok=True)
    return p


def atomic_write(path, write_fn: Callable[[Path], Any]) -> Path:
    """Write `path` atomically: `write_fn(tmp)` writes a temp file in the same folder (its name
    ends with path's suffix, so writers that pick a format by suffix - savefig - still work),
    which is flushed to disk and renamed over `path` with os.replace. A failure (an exception,
    Ctrl-C) leaves the old file as it was and removes the temp file. Creates the parent folder.
    The file gets ordinary permissions (0o666 minus the umask). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_mapping(path, *, what: str, expected: str, error: type[Exception] = ValueError,
                 max_bytes: int | None = None, max_nodes: int | None = None) -> dict:
    """The mapping a YAML file (JSON for a .json suffix) holds. Every way the file can be wrong is
    one `error(message)` naming the file, what is wrong and `expected` (the form it must have): it
    does not exist, is a directory, is binary or not UTF-8, is empty (an empty file is not "the
    defaults"), is not valid YAML/JSON (the parser's line and column), or holds no mapping.
    `what` names the file's role ("plan file", "search space file").
    For files that come from elsewhere (a plan on a device): max_bytes refuses a larger file
    before reading it, and max_nodes a YAML document that would expand to more nodes than that
    once its aliases are followed (a few hundred bytes of nested aliases can name billions of
    values), or whose aliases refer to themselves; checked before anything is constructed."""
    import json

    import yaml

    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a directory: expected {expected}")
    if not p.is_file():
        raise error(f"{what} {p} does not exist: expected {expected}")
    size = p.stat().st_size if max_bytes is not None else 0
    if max_bytes is not None and size > max_bytes:
        raise error(f"{what} {p} is {size:,} bytes, more than the {max_bytes:,} such a file may have: "
                    f"expected {expected}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise error(f"{what} {p} cannot be read ({e.strerror or e}): expected {expected}") from e
    try:
        text = data.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", data, text.index("\x00"), text.index("\x00") + 1, "NUL byte")
    except UnicodeDecodeError as e:
        raise error(f"{what} {p} is binary, not text (byte {e.start}): expected {expected}") from e
    if not text.strip():
        raise error(f"{what} {p} is empty: expected {expected}")
    try:
        d = json.loads(text) if p.suffix.lower() == ".json" else _load_yaml(text, max_nodes)
    except _TooLarge as e:
        raise error(f"{what} {p} {e}: expected {expected}") from None
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply to read: expected {expected}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        mark = getattr(e, "problem_mark", None)
        detail = (f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
                  if mark is not None and getattr(e, "problem", None) else " ".join(str(e).split()))
        raise error(f"{what} {p} is not valid {kind} ({detail}): expected {expected}") from e
    if not isinstance(d, dict):
        raise error(f"{what} {p} holds a {type(d).__name__}, not a mapping of keys: expected {expected}")
    return d


class _TooLarge(Exception):
    """A YAML document that expands past its node limit (the message completes "FILE ...")."""


def _load_yaml(text: str, max_nodes: int | None):
    """yaml.safe_load(text); with max_nodes, the document's node graph is composed first (aliases
    are shared nodes there, cheap) and its size with every alias expanded is counted before a
    value is constructed: _TooLarge above max_nodes or for an alias inside itself."""
    import yaml

    if max_nodes is None:
        return yaml.safe_load(text)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_expanded(node, max_nodes)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_expanded(root, limit: int) -> int:
    """Nodes under `root` with aliases expanded (shared nodes counted once per reference),
    walked without recursion, each node once."""
    total: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = _children(node)
        if done:
            open_.discard(key)
            total[key] = 1 + sum(total[id(k)] for k in kids)
            if total[key] > limit:
                raise _TooLarge(f"expands to more than {limit:,} values once its YAML aliases (*name) are "
                                "followed: write the values out, without anchors and aliases")
            continue
        if key in total:
            continue
        if key in open_:
            raise _TooLarge("holds a YAML alias (*name) inside its own anchor (&name): a value cannot "
                            "contain itself; write the values out")
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in total)
    return total[id(root)]


def _children(node) -> list:
    value = getattr(node, "value", None)
    if not isinstance(value, list):
        return []  # a scalar
    out = []
    for item in value:
        out.extend(item if isinstance(item, tuple) else (item,))  # a mapping's (key, value) pairs
    return out


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (SQLAlchemy's forms: a path, or `file:PATH?...&uri=true`),
    None for other URLs and in-memory databases."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):].split("?", 1)[0].removeprefix("file:")
    return Path(rest) if rest and rest != ":memory:" else None


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Held while a database's schema may be created or migrated (the study's Optuna storage, the
    MLflow tracking store): N workers started at once on a fresh database would all create the
    tables, and all but one crash. A file lock beside a SQLite file (one machine, as SQLite is), a
    PostgreSQL advisory lock (the server's own: it holds across machines), nothing otherwise.
    filelock and SQLAlchemy are imported here: the torch-only core imports this module too."""
    path = sqlite_path(url)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            yield
        return
    if url.split("://", 1)[0].lower().startswith("postgres"):
        import sqlalchemy

        key = zlib.crc32(b"autorank schema") & 0x7FFFFFFF  # one lock per database
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    yield
