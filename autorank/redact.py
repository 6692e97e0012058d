"""Secrets out of everything autorank prints or writes: the password of a storage or tracking URL.

    redact_url("postgresql://autorank:pw@host/db")  -> "postgresql://autorank:***@host/db"
    redact_text(text)       the same for every URL in free text (an error line, a traceback, a
                            YAML file), and password=/token=... options (?sslpassword=..., libpq's
                            "host=... password=...")
    redact_config(obj)      the same in every string of a nested dict/list (the app's config, the
                            MLflow params and the logged config.yaml)
    guard_console()         sys.stdout / sys.stderr pass every write through redact_text (the
                            app's safety net for what libraries print: Hydra's error lines,
                            tracebacks, warnings)
    guard_logging()         the same for every record the root logger's handlers write (Hydra's
                            <job>.log file in the run folder)

One masking (`_mask_url`) serves redact_url (a whole string that is one URL) and redact_text
(every URL found in free text); every caller in autorank goes through these. A URL is parsed, not pattern-matched: SQLAlchemy's `make_url` splits it into its parts and
names the query's keys, and every part that is a secret (the password, the value of a key that
looks secret) is masked where it stands. What is ours, and why:
- finding URLs in free text (SQLAlchemy parses one URL, it does not find them);
- the password runs to the *last* '@' of the URL: SQLAlchemy's parser stops at the first one, so
  an unencoded '@' in a password would leave its tail in the host;
- the URL is masked in place rather than re-rendered with `render_as_string(hide_password=True)`,
  which re-encodes the path (sqlite:///file:/x.db becomes file%3A/x.db, '#' becomes %23): the
  printed URL stays the one the user typed, and still works in `mlflow ui --backend-store-uri`.
Anything SQLAlchemy cannot parse (or a machine without it) falls back to the same masking by
pattern. Bottom layer: no imports of autorank or of the search stack.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "guard_console", "guard_logging", "redact_config", "redact_text", "redact_url"]

MASK = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# A URL in free text: scheme://, an optional user:password@ whose password may hold '@', '/' or
# spaces (it runs to the last '@' on the line that is followed by a host, never across the next
# URL, and across a quote only when there is no '@' before it), then the rest up to whitespace or
# a quote.
_HOST = r"@(?=[\w\[%.\-])"
_URL = re.compile(rf"""\b{_SCHEME}(?:[^\s'"<>:/@]*:(?:(?:(?!\b{_SCHEME})[^\n'"])*{_HOST}"""
                  rf"""|(?:(?!\b{_SCHEME})[^\n])*{_HOST}))?[^\s'"<>]*""")
# key=value whose key looks secret: password, sslpassword, passwd, pwd, secret, client_secret,
# token, access_token, api_key, access_key, private_key, credentials, key (in a URL's query, a
# libpq/ODBC connection string, a command line). Keys are matched whole, so tokenizer= is kept.
_SECRET_KEY = r"(?:[\w.\-]*?(?:password|passwd|pwd|secret|token|api_?key|access_?key|private_?key|credentials?)|key)"
_OPTION = re.compile(rf"""(?i)(?P<head>(?<![\w.\-]){_SECRET_KEY}=)(?P<value>'[^']*'|"[^"]*"|[^&;\s'"#,]+)""")


def _is_secret_key(key: str) -> bool:
    return re.fullmatch(_SECRET_KEY, key, flags=re.IGNORECASE) is not None


def _mask_options(text: str) -> str:
    return _OPTION.sub(lambda m: m["head"] + MASK, text)


def _mask_userinfo(url: str) -> str:
    """scheme://user:password@rest -> scheme://user:***@rest, the password running to the last '@'."""
    start = url.index("://") + 3
    at = url.rfind("@", start)
    colon = url.find(":", start, at) if at != -1 else -1
    if colon == -1 or "/" in url[start:colon] or colon + 1 == at:
        return url
    return url[:colon + 1] + MASK + url[at:]


def _mask_query(url: str) -> str:
    """The values of the query's secret-looking keys masked, the keys named by SQLAlchemy's
    parser; by pattern when it cannot parse the URL."""
    try:
        from sqlalchemy.engine import make_url

        keys = [k for k in make_url(url).query if _is_secret_key(k)]
    except Exception:  # not installed, or not a URL SQLAlchemy parses
        return _mask_options(url)
    head, sep, query = url.partition("?")
    for key in keys:
        query = re.sub(rf"(?:(?<=^)|(?<=[&;])){re.escape(key)}=[^&;]*", f"{key}={MASK}", query)
    return _mask_options(head + sep + query)  # and anything the parser did not see as a key


def _mask_url(url: str) -> str:
    return _mask_query(_mask_userinfo(url))


def redact_url(url: str | None) -> str | None:
    """A storage/tracking URL fit to print or log: its password and secret query values masked
    (see the module doc). A string that is not a URL goes through redact_text."""
    if url is None:
        return None
    s = str(url)
    if re.match(_SCHEME, s.strip()) is None or "\n" in s.strip():
        return redact_text(s)
    lead = s[:len(s) - len(s.lstrip())]
    return lead + _mask_url(s.lstrip())


def redact_text(text: str) -> str:
    """`text` with every URL's password and every password-like option replaced by ***."""
    if "://" not in text and "=" not in text:  # the common case: nothing to look at
        return text
    if "://" in text:
        text = _URL.sub(lambda m: _mask_url(m.group(0)), text)
    return _mask_options(text)
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
