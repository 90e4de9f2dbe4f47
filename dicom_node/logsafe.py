"""PHI-safe logging: no patient data in any log line unless ``--log-phi``.

Our own log lines carry UIDs and salted hashes, never names (by construction, checked by an end
to end test). What we do not write ourselves is filtered here, in every handler the CLI
installs (:func:`install`), at every level:

* **warnings** (``warnings.warn`` from pydicom, highdicom...) are captured into logging
  (``py.warnings``) instead of being printed to stderr; highdicom's, for one, quote the person
  name it dislikes (``The string "DOE" is unlikely to represent the intended person name``);
* **lines of other libraries' loggers** and captured warnings: every quoted (``'...'``,
  ``"..."``) or bracketed (``[...]``, as in data set dumps) part is replaced by ``<redacted>``;
* **exception texts** anywhere (an exception passed as an argument of one of our lines, a string
  argument that quotes a value, a traceback's message lines) get the same treatment; the
  ``File "...", line N`` lines of a traceback are kept;
* uncaught exceptions (main thread and other threads) go through logging as well.

The filter is a :class:`logging.Filter` on the handlers, so it also sees lines that propagate
from loggers configured elsewhere. ``set_show_phi(True)`` (the ``--log-phi`` setting) turns the
redaction off. :func:`install` is also called in child processes (the spawned outputs process
builds the SR and SC with highdicom) with :func:`current_config`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from types import TracebackType
from typing import Any

#: Our packages: their lines are trusted (arguments that are exceptions are still redacted).
OWN_LOGGERS = ("dicom_node", "triage_core", "training", "__main__")
REDACTED = "<redacted>"
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_QUOTED = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'|\[[^\]\n]*\]")
_FRAME_LINE = re.compile(r'^\s+File "[^"\n]*", line \d+')
_state = {"show_phi": False}


def set_show_phi(show: bool) -> None:
    """Log patient data in clear (``--log-phi``) or not (the default)."""
    _state["show_phi"] = bool(show)


def current_config() -> tuple[int, bool]:
    """``(root level, show_phi)``, for :func:`install` in a child process."""
    return logging.getLogger().level, _state["show_phi"]


def redact(text: str) -> str:
    """``text`` with every quoted or bracketed part replaced by ``<redacted>``."""
    return _QUOTED.sub(REDACTED, text)


def redact_traceback(text: str) -> str:
    """A formatted traceback with its message lines redacted (frame lines kept: code, not
    data; the source line under each frame is code too)."""
    out = []
    frame_follows = False
    for line in text.splitlines():
        if _FRAME_LINE.match(line):
            out.append(line)
            frame_follows = True
        elif frame_follows and line.startswith("    "):
            out.append(line)
            frame_follows = False
        else:
            out.append(redact(line))
            frame_follows = False
    return "\n".join(out)


def _is_own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


def _safe_arg(arg: Any) -> Any:
    if isinstance(arg, BaseException):
        return redact(f"{arg.__class__.__name__}: {arg}")
    if isinstance(arg, str) and _QUOTED.search(arg):
        return redact(arg)
    return arg


class PhiFilter(logging.Filter):
    """Redact what may carry patient data in a record (see the module docstring)."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["show_phi"] or getattr(record, "_phi_checked", False):
            return True
        record._phi_checked = True  # several handlers: once is enough
        if not _is_own(record.name):
            record.msg = redact(record.getMessage())
            record.args = None
        elif isinstance(record.args, tuple):
            record.args = tuple(_safe_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _safe_arg(v) for k, v in record.args.items()}
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact_traceback(self._formatter.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_traceback(record.stack_info)
        return True


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("dicom_node").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("dicom_node").critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def install(level: int = logging.WARNING, show_phi: bool = False) -> None:
    """Configure logging for this process: one stderr handler with :class:`PhiFilter` on the
    root logger (replacing the one an earlier call installed; handlers someone else installed
    get the filter too), warnings captured, uncaught exceptions logged."""
    set_show_phi(show_phi)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_cxr_triage", False):
            root.removeHandler(old)
        elif not any(isinstance(f, PhiFilter) for f in old.filters):
            old.addFilter(PhiFilter())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(PhiFilter())
    handler._cxr_triage = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    capture_warnings()
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def capture_warnings() -> None:
    """Route ``warnings.warn`` into logging (``py.warnings``), also when something (a test
    runner's ``catch_warnings``) restored ``warnings.showwarning`` behind logging's back."""
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def add_handler(handler: logging.Handler) -> None:
    """Add another handler (a log file) to the root logger, with the PHI filter."""
    handler.addFilter(PhiFilter())
    if handler.formatter is None:
        handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
