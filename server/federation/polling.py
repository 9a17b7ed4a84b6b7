"""A Grid that waits for replies with a short poll, and remembers when each message left and each reply came.

Flower 1.41's deployment ``Grid.send_and_receive`` pushes the messages, then pulls replies and
sleeps 3 s between pulls, so every message costs the ServerApp up to 3 s after the last reply is
in. :class:`PollingGrid` wraps any Grid (deployment or simulation) and does the same
push-then-pull with a configurable interval; everything else is passed through. The send and
arrival times feed the per-message breakdown (``bench/bench_native.py``).

It also puts the model on the wire as one Array per record (``shared.wire``): messages are packed
before the push and replies unpacked after the pull, so strategies see ordinary ArrayRecords.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message

from shared.wire import PackedRecordError, pack_record, unpack_content

__all__ = ["PollingGrid", "DEFAULT_POLL_INTERVAL", "IN_MEMORY_POLL_INTERVAL", "is_in_memory"]

DEFAULT_POLL_INTERVAL = 0.2  # seconds between reply pulls; one small request to the SuperLink each
# The Simulation Engine's grid reads replies from in-process state: a pull is a dictionary lookup, so
# it is polled at this interval whatever the run config says (0.2 s cost ~0.1 s per phase and round).
IN_MEMORY_POLL_INTERVAL = 0.01


def is_in_memory(grid) -> bool:
    """Whether ``grid`` is the Simulation Engine's (replies in this process) rather than a SuperLink's."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # another Flower layout: decide by name
        return "InMemory" in type(grid).__name__
    return isinstance(grid, InMemoryGrid)


class PollingGrid:
    """``grid`` with a ``send_and_receive`` that pulls replies every ``interval`` seconds
    (:data:`IN_MEMORY_POLL_INTERVAL` for the Simulation Engine's grid).

    ``sent_at[message_id]`` and ``arrived_at[message_id]`` (keyed by the *sent* message's id) hold
    wall-clock times of the push's start and of each reply's arrival.
    """

    def __init__(self, grid, interval: float = DEFAULT_POLL_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError(f"poll interval must be positive, got {interval}")
        self._grid = grid
        self.interval = min(float(interval), IN_MEMORY_POLL_INTERVAL) if is_in_memory(grid) else float(interval)
        self.sent_at: dict[str, float] = {}
        self.arrived_at: dict[str, float] = {}

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # a round without this phase (e.g. evaluation sent with training)
            return []
        _pack(messages)
        pushed = time.time()  # a SuperNode may pull the first message before the push of the last returns
        pending = set(self._grid.push_messages(messages))
        self.sent_at.update(dict.fromkeys(pending, pushed))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            now = time.time()
            for msg in got:
                _unpack(msg)
                self.arrived_at[msg.metadata.reply_to_message_id] = now
                pending.discard(msg.metadata.reply_to_message_id)
            replies.extend(got)
            if not pending or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return replies


def _pack(messages: list[Message]) -> None:
    """Pack every message's ArrayRecords; one packed copy of a record the messages share."""
    packed: dict[int, ArrayRecord] = {}
    for msg in messages:
        for key, record in list(msg.content.array_records.items()):
            if id(record) not in packed:
                packed[id(record)] = pack_record(record)
            msg.content[key] = packed[id(record)]


def _unpack(msg: Message) -> None:
    """Restore a reply's packed ArrayRecords; a damaged one stays packed, and the strategy's update check
    (``check_update``) then refuses it with the reason."""
    if msg.has_error() or not msg.has_content():
        return
    try:
        msg.content = unpack_content(msg.content)
    except PackedRecordError:
        pass
