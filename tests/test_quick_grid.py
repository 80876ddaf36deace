"""The coordinator's short-poll Grid: same replies as Flower's loop, collected without 3 s sleeps."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server.quick_grid import QuickPollGrid


class FakeGrid:
    """Replies to message ``i`` become available at pull number ``ready[i]``."""

    def __init__(self, ready: list[int]):
        self.ready = ready
        self.pulls = 0
        self.delivered: set[str] = set()

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in sorted(ids):
            if self.ready[int(mid[1:])] <= self.pulls and mid not in self.delivered:
                self.delivered.add(mid)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out

    def get_node_ids(self):
        return [1, 2, 3]


def test_it_collects_every_reply_at_the_short_interval():
    fake = FakeGrid(ready=[1, 3, 5])
    grid = QuickPollGrid(fake, interval=0.01)
    t0 = time.monotonic()
    replies = grid.send_and_receive(["a", "b", "c"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert fake.pulls == 5
    assert time.monotonic() - t0 < 1.0  # Flower's own loop would have slept 4 x 3 s


def test_it_stops_at_the_timeout_with_the_replies_it_has():
    fake = FakeGrid(ready=[1, 10**9])
    replies = QuickPollGrid(fake, interval=0.01).send_and_receive(["a", "b"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert fake.pulls >= 2


def test_everything_else_is_the_wrapped_grid():
    fake = FakeGrid(ready=[])
    assert list(QuickPollGrid(fake).get_node_ids()) == [1, 2, 3]
    with pytest.raises(ValueError, match="positive"):
        QuickPollGrid(fake, interval=0)


def test_each_batch_of_replies_is_handed_on_as_it_arrives():
    fake = FakeGrid(ready=[1, 3, 3])
    batches = []
    replies = QuickPollGrid(fake, interval=0.01, on_arrival=lambda got: batches.append(
        [r.metadata.reply_to_message_id for r in got])).send_and_receive(["a", "b", "c"])
    assert batches == [["m0"], ["m1", "m2"]]  # pulls 2 brought nothing: no call
    assert len(replies) == 3
