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
        await view.overview(max_age=0, listing=True)
        async with trio.open_nursery() as n:
            n.start_soon(view.refresh_forever)
            for _ in range(10):  # a listing every 20 s, each taking what is at most 15 s old
                await trio.sleep(20)
                await view.overview(max_age=15, listing=True)
            assert view.lookups_run == 1  # every listing after the first came from the view
            await trio.sleep(IN_USE_S * 2)
            n.cancel_scope.cancel()

    node = _run(scenario)
    last_listing = 200
    assert max(t for t, _ in node.calls) < last_listing + IN_USE_S + REFRESH_S



def test_a_model_chosen_from_a_fresh_overview_is_not_walked_for_again():
    """An ask naming no model lists the swarm to choose one; the model's lookups, whole and in
    shards, come from that list (every serving peer announces the swarm key too)."""
    from gputorrent.dht.records import Advert, Device, ServedModel

    ad = Advert(peer_id="12D3KooWA8p5zrKnzJKJ69KvSdQDhGvDKFeHRiAfcKFu2H2yVLh6", seq=1, issued_at=0.0,
                expires_at=1e12, addrs=["/ip4/127.0.0.1/tcp/1"], device=Device(kind="cpu", name="cpu"),
                models=[ServedModel(model_id=MODEL, alias="m", quantization="Q4_1", context_length=512, end_block=30,
                                    total_blocks=30)])

    class Node(RecordingNode):
        async def overview(self) -> list:
            await super().overview()
            return [ad]

    async def scenario(node: RecordingNode) -> None:
        view = SwarmView(None, node, None)
        assert await view.overview() == [ad]
        assert [a.peer_id for a in await view.find(MODEL)] == [ad.peer_id]
        assert await view.find(MODEL, whole=False) == []  # a short overview is complete
        assert view.lookups_run == 1
        async with trio.open_nursery() as n:  # an ask's overview is not kept up by crawls
            n.start_soon(view.refresh_forever)
            await trio.sleep(IN_USE_S / 2)
            n.cancel_scope.cancel()

    node = Node()
    trio.run(scenario, node, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "overview" not in [kind for _, kind in node.calls[1:]], node.calls[:4]
