"""Log lines that say what they are about: the namespace, container and exec ids of the call
(or task) a line is logged from, as fields of their own, in text and in JSON.

A call's handler binds them once (:func:`bind`); every line logged while it runs, and from the
asyncio tasks it starts, carries them. A line may name others with ``extra={"container": id}``.
The text format is logfmt (``key=value``, quoted where needed), as containerd's logs are.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

#: the fields, in the order they are printed
FIELDS = ("namespace", "container", "exec")

_bound: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("ketch_log_fields", default={})


def bind(**fields: str) -> None:
    """Add ``fields`` (empty values ignored) to those of the current context: the rest of the
    call, and the tasks it starts from now on."""
    new = {k: v for k, v in fields.items() if v}
    if new:
        _bound.set({**_bound.get(), **new})


def current() -> dict[str, str]:
    return dict(_bound.get())


class FieldsFilter(logging.Filter):
    """Gives every record the bound fields it does not set itself (as attributes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _bound.get().items():
            if not getattr(record, key, None):
                setattr(record, key, value)
        return True


def _fields_of(record: logging.LogRecord) -> dict[str, str]:
    return {key: str(value) for key in FIELDS if (value := getattr(record, key, None))}


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t\\'):
        return value
    return json.dumps(value)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``time=… level=… logger=… msg=… namespace=… container=… exec=…`` (logfmt), plus
    ``static`` fields every line of this process carries."""

    def __init__(self, static: dict[str, str] | None = None) -> None:
        super().__init__()
        self._static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        parts: dict[str, str] = {"time": _timestamp(record), "level": record.levelname.lower(),
                                 "logger": record.name, "msg": record.getMessage()}
        parts.update(self._static)
        parts.update(_fields_of(record))
        line = " ".join(f"{k}={_quote(v)}" for k, v in parts.items())
        if record.exc_info:
            line += f" error={_quote(self.formatException(record.exc_info))}"
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line, the fields as keys."""

    def __init__(self, static: dict[str, str] | None = None) -> None:
        super().__init__()
        self._static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": _timestamp(record), "level": record.levelname.lower(),
                                 "logger": record.name, "msg": record.getMessage()}
        entry.update(self._static)
        entry.update(_fields_of(record))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL, "critical": logging.CRITICAL}


def parse(line: str) -> dict[str, str]:
    """The ``key=value`` pairs of a logfmt line (ours, or logrus's as containerd's shim writes
    them); a value may be double-quoted with backslash escapes. Empty if ``line`` is not logfmt."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq <= i or " " in line[i:eq]:
            return out if i >= n else {}
        key, i = line[i:eq], eq + 1
        if i < n and line[i] == '"':
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            try:
                out[key] = json.loads(line[i:j + 1])
            except ValueError:
                out[key] = line[i + 1:j]
            i = j + 1
        else:
            j = line.find(" ", i)
            j = n if j < 0 else j
            out[key], i = line[i:j], j
    return out


def relay(logger: logging.Logger, line: str, **fields: str) -> None:
    """Log a line another process wrote (a shim's) as one of ours: its level, message and
    fields kept when it is logfmt; ``fields`` (the shim's namespace…) where it has none."""
    parsed = parse(line)
    if "msg" not in parsed:
        logger.info("%s", line, extra={k: v for k, v in fields.items() if v})
        return
    extra = {k: v for k, v in fields.items() if v}
    extra.update({k: parsed[k] for k in FIELDS if parsed.get(k)})
    if "container" not in extra and parsed.get("id"):
        extra["container"] = parsed["id"]
    logger.log(_LEVELS.get(parsed.get("level", "info").lower(), logging.INFO), "%s", parsed["msg"], extra=extra)


def handler(stream: Any, fmt: str = "text", static: dict[str, str] | None = None) -> logging.Handler:
    """A handler writing to ``stream`` in ``fmt`` ("text" or "json") with the fields."""
    h = logging.StreamHandler(stream)
    h.setFormatter(JSONFormatter(static) if fmt == "json" else TextFormatter(static))
    h.addFilter(FieldsFilter())
    return h
