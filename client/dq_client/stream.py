"""A job's event stream (Server-Sent Events) read line by line, across reconnections."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dq_client.models import Job


@dataclass
class ServerEvent:
    """One Server-Sent Event: its type, data and id."""

    event: str = "message"
    data: str = ""
    id: str | None = None


@dataclass
class EventDecoder:
    """Turns the lines of a `text/event-stream` into events (the WHATWG rules that matter here)."""

    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, line: str) -> ServerEvent | None:
        """Take one line (without its newline); an empty line completes an event."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> ServerEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerEvent(self._event or "message", "\n".join(self._data), self._id)
        self._event, self._data = "", []
        return event


@dataclass
class JobEvents:
    """The jobs a stream delivers, without the repeats that a reconnection brings."""

    job_id: str
    decoder: EventDecoder = field(default_factory=EventDecoder)
    last_event_id: str | None = None
    done: bool = False
    seen: int = 0  # events received, repeats included
    _last_state: str | None = None

    def reconnecting(self) -> dict[str, str]:
        """Headers for the next connection; a cut stream's partial event is dropped."""
        self.decoder = EventDecoder()
        return {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}

    def feed(self, line: str) -> Job | None:
        """Take one line; returns the job when an event completes with something new."""
        event = self.decoder.feed(line)
        if event is None:
            return None
        self.seen += 1
        if event.id is not None:
            self.last_event_id = event.id
        job = Job.from_dict(json.loads(event.data))
        # A new connection starts with the job as it is now, which may be what we last saw.
        state = json.dumps([job.status, job.raw.get("progress"), job.raw.get("queue")])
        if state == self._last_state:
            return None
        self._last_state = state
        self.done = job.terminal
        return job
