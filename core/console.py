"""The terminal of `dq up`: its children's lines, each prefixed with its writer, the noise left out.

Every child logs `2026-12-01 22:49:05,080 INFO scaler.loop message` (the format each entrypoint
configures). By default the console shows one short line per event, `22:49:05 scaler   message`:
the project's own INFO lines and every warning and error, but not library chatter (Celery's
connection notes, progress bars and prints a library makes, deprecation warnings). `--verbose`
shows every line as written. Errors are always shown, with their tracebacks.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, TextIO

RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d (?P<time>\d\d:\d\d:\d\d),\d+ "
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<logger>\S+) (?P<message>.*)$"
)
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
# Loggers whose INFO lines are the story of the system; other INFO lines are library detail.
OURS = ("api", "worker", "scaler", "__main__", "dq")
# Loggers that relay what libraries print or deprecate: shown with --verbose, or when they
# carry an error.
CHATTER = ("celery.redirected", "py.warnings")
ALARMS = ("Traceback", "Error", "Exception")
# Lines no logger of ours wrote that are worth seeing: an uncaught exception, a child refusing
# its settings (`dq: …`) before it exits, uvicorn's own warnings and errors.
RAW_ALARMS = ("Traceback", "dq: ", "dq api: ", "WARNING:", "ERROR:", "CRITICAL:")
# The scaler's pipe also carries the lines of the workers it starts (they inherit it).
SCALER_OWN = ("scaler", "core")

COLORS = {"gateway": 36, "scaler": 35, "worker": 32, "webhooks": 34, "dq": 1}
LEVEL_COLORS = {"WARNING": 33, "ERROR": 31, "CRITICAL": 31}


@dataclass
class Record:
    """The log record a line starts, or continues (a traceback, a message of several lines)."""

    who: str
    level: str
    shown: bool


def label(child: str, logger: str) -> str:
    """Who wrote a line: the child, or a worker when the scaler's pipe carries it."""
    if child != "scaler" or logger.split(".")[0] in SCALER_OWN:
        return child
    return "worker"


def concise(level: str, logger: str, message: str) -> bool:
    """Whether a record is shown without --verbose."""
    if LEVELS[level] >= LEVELS["ERROR"]:
        return True
    if logger in CHATTER:
        return any(word in message for word in ALARMS)
    if LEVELS[level] >= LEVELS["WARNING"]:
        return True
    return level == "INFO" and logger.split(".")[0] in OURS


class Console:
    """Writes the lines of every child to one terminal, one line at a time."""

    def __init__(self, out: TextIO, *, verbose: bool, color: bool) -> None:
        self.out, self.verbose, self.color = out, verbose, color
        self.width = max(len(name) for name in COLORS)
        self.lock = threading.Lock()
        self.last: dict[str, Record] = {}  # per child: the record its next raw line continues
        self.held: list[str] | None = None  # lines kept back until the status block is out

    @classmethod
    def for_terminal(cls, *, verbose: bool) -> Console:
        """A console on stdout, in color when it is a terminal (and NO_COLOR is not set)."""
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        return cls(sys.stdout, verbose=verbose, color=color)

    def relay(self, child: str, pipe: IO[bytes]) -> threading.Thread:
        """Copy a child's output to the console, from a thread, until the child closes it."""
        thread = threading.Thread(
            target=self._pump, args=(child, pipe), name=f"relay {child}", daemon=True
        )
        thread.start()
        return thread

    def _pump(self, child: str, pipe: IO[bytes]) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                self.line(child, raw.decode("utf-8", "replace").rstrip("\r\n"))

    def line(self, child: str, text: str) -> None:
        """Show one line a child wrote (or not, by the rules above)."""
        shown = self.render(child, text)
        if shown is not None:
            self.write(shown)

    def render(self, child: str, text: str) -> str | None:
        """The line as shown, or None when it is left out."""
        match = RECORD.match(text)
        if match is None:
            return self._raw(child, text)
        level, logger = match["level"], match["logger"]
        record = Record(label(child, logger), level, concise(level, logger, match["message"]))
        self.last[child] = record
        if self.verbose:
            return f"{self.tag(record.who)} {text}"
        if not record.shown:
            return None
        mark = "" if level == "INFO" else self.paint(f"{level.lower()}: ", LEVEL_COLORS[level])
        return f"{match['time']} {self.tag(record.who)} {mark}{match['message']}"

    def _raw(self, child: str, text: str) -> str | None:
        """A line no log record starts: the rest of a warning or error before it (a traceback, a
        message of several lines), something alarming of its own, or else print()'s chatter."""
        record = self.last.get(child)
        if text.startswith(RAW_ALARMS):
            record = self.last[child] = Record(child, "ERROR", True)
        elif record is None:  # before any record: the child is failing before its logging
            record = self.last[child] = Record(child, "ERROR", bool(text.strip()))
        continues = record.shown and record.level != "INFO" and bool(text.strip())
        if not (continues or self.verbose):
            return None
        if self.verbose:
            return f"{self.tag(record.who)} {text}"
        return f"{' ' * 8} {self.tag(record.who)} {text}"  # under the message it continues

    def tag(self, who: str) -> str:
        """The prefix that says who wrote a line, padded so messages line up."""
        return self.paint(who.ljust(self.width), COLORS.get(who, 0))

    def paint(self, text: str, code: int) -> str:
        """`text` in an ANSI color (or as is, on a pipe)."""
        return f"\033[{code}m{text}\033[0m" if self.color and code else text

    def write(self, text: str) -> None:
        """Write whole lines, never interleaved with another thread's."""
        with self.lock:
            if self.held is not None:
                self.held.append(text)
                return
            self.out.write(text + "\n")
            self.out.flush()

    def hold(self) -> None:
        """Keep lines back from now on (the start's lines come after the status block)."""
        with self.lock:
            self.held = [] if self.held is None else self.held

    def release(self, first: Iterable[str] = ()) -> None:
        """Write `first` (the status block), then the lines held back, and stop holding."""
        with self.lock:
            held, self.held = self.held or [], None
            self.out.write("".join(f"{line}\n" for line in [*first, *held]))
            self.out.flush()


class ConsoleHandler(logging.Handler):
    """The launcher's own log records, shown like its children's lines (as `dq`)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s dq %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        """Render the record through the console's rules."""
        try:
            self.console.line("dq", self.format(record))
        except Exception:
            self.handleError(record)
