"""Secrets out of everything autorank prints or writes: the password of a storage or tracking URL.

    redact_url("postgresql://autorank:pw@host/db")  -> "postgresql://autorank:***@host/db"
    redact_text(text)       the same for every URL in free text (an error line, a traceback, a
                            YAML file), and password=/token=... options (?password=..., libpq's
                            "host=... password=...")
    redact_config(obj)      the same in every string of a nested dict/list (the app's config, the
                            MLflow params and the logged config.yaml)
    guard_console()         sys.stdout / sys.stderr pass every write through redact_text (the
                            app's safety net for what libraries print: Hydra's error lines,
                            tracebacks, warnings)
    guard_logging()         the same for every record the root logger's handlers write (Hydra's
                            <job>.log file in the run folder)

Our own few regexes rather than SQLAlchemy's URL masking (`URL.render_as_string`): they must
also work on free text and on URLs SQLAlchemy cannot parse (http://, file options), and stay at
the bottom layer (no imports of autorank or of the search stack).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "guard_console", "guard_logging", "redact_config", "redact_text", "redact_url"]

MASK = "***"

# scheme://user:password@ : the password runs to the last '@' before a '/', whitespace or the end
# (an unencoded '@' in a password is still hidden whole).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)(?P<pw>[^\s/]*)@")
# password=..., token=..., in a URL's query or a libpq/ODBC connection string
_OPTION = re.compile(r"(?i)(?P<head>\b(?:password|passwd|pwd|secret|token|access_token|api_?key)=)"
                     r"(?P<pw>[^&;\s'\"#]+)")


def redact_text(text: str) -> str:
    """`text` with every URL password and password-like option replaced by ***."""
    if "=" not in text and "@" not in text:  # the common case: nothing to look at
        return text
    text = _USERINFO.sub(lambda m: m["head"] + (MASK if m["pw"] else "") + "@", text)
    return _OPTION.sub(lambda m: m["head"] + MASK, text)


def redact_url(url: str | None) -> str | None:
    """A storage/tracking URL fit to print or log: its password (and password options) masked."""
    return None if url is None else redact_text(str(url))


def redact_config(obj: Any) -> Any:
    """A copy of a nested dict/list/tuple with redact_text applied to every string value (keys
    are kept); other values as they are."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, Mapping):
        return {k: redact_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_config(v) for v in obj)
    return obj


class RedactingStream:
    """A text stream that writes redact_text(s) to the stream it wraps; everything else (isatty,
    fileno, encoding, flush, buffer) is the wrapped stream's. print() and logging hand whole
    strings to write(), so a URL is not split across two calls."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        self.stream.write(redact_text(s) if isinstance(s, str) else s)
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def guard_console() -> None:
    """Wrap sys.stdout and sys.stderr in a RedactingStream (once). Call it first in a CLI's
    main(), before Hydra or logging take a reference to the streams."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


class RedactingFilter(logging.Filter):
    """Formats a record's message once, redacted (its args are consumed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def guard_logging() -> None:
    """Add a RedactingFilter to every handler of the root logger (once): call it after logging is
    configured (Hydra does it before the job starts)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
