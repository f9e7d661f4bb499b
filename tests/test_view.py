"""The requester's kept view (asking/view.py): what it refreshes in the background, and for how
long. Virtual time (trio's MockClock) over a node that records its lookups: 300 s of "in use"
pass in milliseconds, and every lookup the view makes is counted."""

from __future__ import annotations

import trio
import trio.testing

from gputorrent.asking.view import IN_USE_S, REFRESH_S, SwarmView

MODEL = "ab" * 32  # a model id: not a catalog alias


class RecordingNode:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    async def find_model(self, spec: str, shards: bool = False) -> list:
        self.calls.append((trio.current_time(), "shards" if shards else "model"))
        return []

    async def overview(self) -> list:
        self.calls.append((trio.current_time(), "overview"))
        return []

    async def served(self) -> list:
        self.calls.append((trio.current_time(), "served"))
        return []


def _run(scenario) -> RecordingNode:
    node = RecordingNode()
    trio.run(scenario, node, clock=trio.testing.MockClock(autojump_threshold=0))
    return node


def test_a_model_asked_for_once_is_refreshed_while_in_use_then_no_more():
    async def scenario(node: RecordingNode) -> None:
        view = SwarmView(None, node, None)
        await view.find(MODEL)
        async with trio.open_nursery() as n:
            n.start_soon(view.refresh_forever)
            await trio.sleep(IN_USE_S * 3)
            n.cancel_scope.cancel()
        assert view.lookups_run == 1 and view.refreshes_run == len(node.calls) - 1

    node = _run(scenario)
    times = [t for t, _ in node.calls]
    assert len(times) >= IN_USE_S / REFRESH_S - 1  # kept fresh while in use...
    assert max(times) < IN_USE_S + REFRESH_S  # ...and not after: a refresh is not use


def test_the_overview_is_kept_fresh_while_listings_use_it_and_answered_from_the_view():
    async def scenario(node: RecordingNode) -> None:
        view = SwarmView(None, node, None)
        await view.overview(max_age=0)
        async with trio.open_nursery() as n:
            n.start_soon(view.refresh_forever)
            for _ in range(10):  # a listing every 20 s, each taking what is at most 15 s old
                await trio.sleep(20)
                await view.overview(max_age=15)
            assert view.lookups_run == 1  # every listing after the first came from the view
            await trio.sleep(IN_USE_S * 2)
            n.cancel_scope.cancel()

    node = _run(scenario)
    last_listing = 200
    assert max(t for t, _ in node.calls) < last_listing + IN_USE_S + REFRESH_S


def test_a_listing_takes_an_asks_fresh_served_list_and_the_overview_follows_in_the_background():
    async def scenario(node: RecordingNode) -> None:
        view = SwarmView(None, node, None)
        await view.served(max_age=0)  # an ask that named no model
        await view.listing(15)  # a warm agent's peers, right after
        assert view.lookups_run == 1
        async with trio.open_nursery() as n:
            n.start_soon(view.refresh_forever)
            await trio.sleep(REFRESH_S + 1)
            n.cancel_scope.cancel()
        await view.listing(0)  # peers --fresh
        assert view.lookups_run == 2

    node = _run(scenario)
    assert [kind for _, kind in node.calls] == ["served", "overview", "overview"]
