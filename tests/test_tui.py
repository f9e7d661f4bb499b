"""The Textual app under its test pilot against a real 3-peer swarm, and SVG snapshots of the
main screen (rendered from fixed, signed adverts so the picture is the same on every run)."""

import asyncio
import os
from pathlib import Path

import pytest

from gputorrent import Swarm
from gputorrent.api.swarm import PeerStatus
from gputorrent.dht.records import Advert, Device, Load, ServedModel
from gputorrent.identity import Identity
from gputorrent.tui import SwarmApp
from gputorrent.tui.app import Answer

from .conftest import QUESTION

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def three(swarm):
    boot = swarm.bootstrap("tui-boot")
    for name in ("tui-a", "tui-b", "tui-c"):
        swarm.spawn(name, "--bootstrap", boot.addr, "--ctx", "1024", "--rate-limit", "0", "--name", name)
    for name in ("tui-a", "tui-b", "tui-c"):
        swarm.peers[name].wait_ready(120)
    return boot.addr, {swarm.peers[n].peer_id: n for n in ("tui-a", "tui-b", "tui-c")}


async def until(pilot, check, timeout: float = 30.0, what: str = "") -> None:
    """Let the app run until ``check()`` holds (it updates from another process's DHT state
    and from a token stream; there is no single event to await from the test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await pilot.pause(0.1)


def test_peers_fill_a_question_streams_and_a_ban_opens_the_breaker(three, tmp_path):
    boot, names = three
    app = SwarmApp(Swarm([boot], mdns=False, identity=tmp_path / "me.key", data_dir=tmp_path / "data",
                         watch_interval=0.5), params={"temperature": 0, "max_tokens": 24})

    async def scenario() -> None:
        async with app.run_test(size=(150, 42)) as pilot:
            table = app.query_one("#peers")
            await until(pilot, lambda: table.row_count == 3, what="three peers in the table")
            assert set(app.peers) == set(names)
            assert "3 peers" in str(app.query_one("#totals").render())

            await pilot.press("a")
            assert app.focused is app.query_one("#prompt")
            await pilot.press(*QUESTION, "enter")
            await until(pilot, lambda: "receipt verified" in str(app.query_one(".meta").render()),
                        what="a finished answer")
            answer = str(app.query_one(Answer).render())
            assert "Paris" in answer
            served_by = str(app.query_one(".meta").render())
            assert any(pid[-10:] in served_by for pid in names)

            table.focus()
            await pilot.press("home")
            victim = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            await pilot.press("b")
            await until(pilot, lambda: app.peers[victim].banned, what="the ban")
            assert str(table.get_cell(victim, "breaker")) == "open (banned)"
            assert "breaker open (banned)" in str(app.query_one("#detail").render())
            log = "\n".join(str(line.text) for line in app.query_one("#log").lines)
            assert f"banned …{victim[-10:]}" in log
            shot = app.save_screenshot(path=str(tmp_path), filename="tui.svg")
            if os.environ.get("GPUTORRENT_UPDATE_DOCS"):
                (DOCS / "tui.svg").write_text(Path(shot).read_text())
            assert "Paris" in Path(shot).read_text()
            await pilot.press("b")  # unban: the breaker closes again
            await until(pilot, lambda: not app.peers[victim].banned, what="the unban")
            assert str(table.get_cell(victim, "breaker")) == "closed"

            # Responsive while streaming: keys act before a long answer is done.
            app.params["max_tokens"] = 400  # a story runs to the limit: seconds of streaming
            await pilot.press("a", *"Write a long story about a cat who sails around the world.", "enter")
            await until(pilot, lambda: len(app.query(Answer)) == 2 and str(app.query(Answer).last().render()),
                        what="the second answer to start")
            table.focus()
            await pilot.press("m")
            assert app.sub_title == "model: smollm2" and app.asking  # filtered while tokens still arrive
            await until(pilot, lambda: not app.asking, timeout=60, what="the second answer to finish")
            assert "receipt verified" in str(app.query(".meta").last().render())
            story = str(app.query(Answer).last().render())
            assert len(story) > 200 and "cat" in story.lower()  # the whole answer is shown once it finished

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_swarm_that_cannot_be_joined_is_reported_not_a_crash(tmp_path):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    app = SwarmApp(Swarm([dead], mdns=False, identity=tmp_path / "me.key", data_dir=tmp_path / "data"))

    async def scenario() -> None:
        async with app.run_test() as pilot:
            await until(pilot, lambda: "not connected" in str(app.query_one("#totals").render()))
            await pilot.press("a", *"hello", "enter")
            await until(pilot, lambda: "not connected" in str(app.query_one(".meta").render()))

    asyncio.run(asyncio.wait_for(scenario(), 60))


# --- snapshots ---------------------------------------------------------------------------------


def _frozen_peers() -> list[PeerStatus]:
    """Three peers as signed adverts would describe them, with fixed identities and figures."""
    model = ServedModel(model_id="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", alias="smollm2",
                        quantization="Q4_1", context_length=2048, end_block=30, total_blocks=30)
    specs = [("attic-4090", Device(kind="gpu", name="NVIDIA GeForce RTX 4090", cores=16, ram_mb=65536,
                                   vram_total_mb=24564, vram_free_mb=20110, compute="8.9"), Load(active=1, slots=8), 212.0,
              0.98, "closed", 14.2),
             ("lab-h100", Device(kind="gpu", name="NVIDIA H100 80GB HBM3", cores=32, ram_mb=262144,
                                 vram_total_mb=81559, vram_free_mb=79000, compute="9.0"), Load(active=3, slots=16), 480.0,
              1.0, "closed", 31.5),
             ("old-laptop", Device(kind="cpu", name="Intel Core i5-8250U", cores=8, ram_mb=16000), Load(slots=2),
              21.0, 0.41, "open", None)]
    out = []
    for i, (name, device, load, speed, rep, brk, rtt) in enumerate(specs):
        ident = Identity(bytes([i + 1]) * 32)
        advert = Advert(peer_id=ident.peer_id, seq=1, issued_at=1_800_000_000.0, expires_at=1_800_000_120.0,
                        addrs=[f"/ip4/192.0.2.{i + 10}/tcp/4001/p2p/{ident.peer_id}"], name=name, device=device,
                        models=[model], load=load, tokens_per_s=speed, version="0.1.0")
        out.append(PeerStatus(advert, rep, brk, rtt, observed={"successes": 12 - 4 * i, "failures": i}))
    return out


class FrozenSwarm:
    """What the app reads from a Swarm, fixed: the snapshot shows layout and formatting, which
    the real-swarm test above cannot pin down (ids, ports and timings change every run)."""

    peer_id = "12D3KooWSnapshotRequester"

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def peers(self, model=None, *, ping=False):
        return _frozen_peers()

    async def events(self):
        await asyncio.Event().wait()
        yield  # pragma: no cover


def _frozen_app() -> SwarmApp:
    return SwarmApp(FrozenSwarm())


async def _settle(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.query_one("#peers").row_count == 3)
    app.query_one("#log").clear()  # its lines carry the wall-clock time
    # Minutes of history, as crawls would have brought it: the sparklines have something to draw.
    app.speed_history.extend([0, 212, 212, 692, 480, 713, 713, 480, 212, 0, 212, 692])
    for i, pid in enumerate(app.load_history):
        app.load_history[pid].extend([(k * (i + 1)) % 5 / 4 for k in range(12)])
    app._update_totals()
    app._show_detail()
    await pilot.pause()


def test_snapshot_main_screen(snap_compare):
    assert snap_compare(_frozen_app(), terminal_size=(150, 36), run_before=_settle)


def test_snapshot_filtered_by_model_with_a_peer_selected(snap_compare):
    async def select(pilot) -> None:
        await _settle(pilot)
        await pilot.press("down", "m")
        await pilot.pause()

    assert snap_compare(_frozen_app(), terminal_size=(150, 36), run_before=select)


def test_names_from_adverts_are_shown_as_text_never_as_markup():
    import msgspec

    evil = "[/]x[link=http://e]"  # would end a markup tag that is not open: Rich raises on it
    peers = _frozen_peers()
    peers[0] = PeerStatus(msgspec.structs.replace(peers[0].advert, name=evil), 1.0, "closed")

    class Evil(FrozenSwarm):
        async def peers(self, model=None, *, ping=False):
            return peers

    app = SwarmApp(Evil())

    async def scenario() -> None:
        async with app.run_test(size=(150, 36)) as pilot:
            await _settle(pilot)
            table = app.query_one("#peers")
            assert str(table.get_cell(peers[0].peer_id, "name")) == evil[:14]
            table.move_cursor(row=table.get_row_index(peers[0].peer_id))
            await pilot.pause()
            assert evil in str(app.query_one("#detail").render())

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_snapshot_at_80x24(snap_compare):
    """A laptop's terminal: the table keeps the columns that matter most, nothing cut mid-way."""
    assert snap_compare(_frozen_app(), terminal_size=(80, 24), run_before=_settle)


def test_snapshot_at_160x48(snap_compare):
    assert snap_compare(_frozen_app(), terminal_size=(160, 48), run_before=_settle)


def test_columns_collapse_by_priority():
    from gputorrent.tui.app import COLUMNS, PRIORITY, WIDTH, columns_for

    assert columns_for(10_000) == COLUMNS
    narrow = columns_for(80 - 30 - 2)
    assert narrow == ("peer", "models", "load", "breaker")
    assert sum(WIDTH[c] for c in narrow) <= 48
    assert columns_for(0) == ("peer",) and set(PRIORITY) == set(COLUMNS)


class TalkingSwarm(FrozenSwarm):
    """The frozen swarm, answering every question with a fixed text and noting what it was sent."""

    def __init__(self) -> None:
        self.sent: list = []

    async def stream(self, prompt, **kw):
        from gputorrent.api import Finished, Text
        from gputorrent.asking.asker import Answer as Done

        self.sent.append(list(prompt))
        yield Text("Paris.", "12D3KooWSnapshotPeer")
        yield Finished(Done("Paris.", "12D3KooWSnapshotPeer", "m" * 64, "stop", {"completion_tokens": 2}, 10.0, 50.0,
                            True))


def test_the_chat_keeps_its_conversation_escape_leaves_the_input_and_ctrl_n_starts_over():
    async def main() -> None:
        swarm = TalkingSwarm()
        app = SwarmApp(swarm)
        async with app.run_test(size=(80, 24)) as pilot:
            await _settle(pilot)
            for question in ("What is the capital of France?", "And of Italy?"):
                await pilot.press("a")
                await pilot.press(*question, "enter")
                await until(pilot, lambda: not app.asking and len(app.messages) >= 2 * (len(swarm.sent)))
            assert [len(m) for m in swarm.sent] == [1, 3]  # the second question carried the first exchange
            assert swarm.sent[1][1] == {"role": "assistant", "content": "Paris."}
            assert app.focused is app.query_one("#prompt")
            await pilot.press("escape")
            assert app.focused is app.query_one("#peers")
            await pilot.press("m")  # a table key again, not a letter typed into the question
            assert app.query_one("#prompt").value == "" and app.model == "smollm2"
            await pilot.press("ctrl+n", "a", *"Hi", "enter")
            await until(pilot, lambda: len(swarm.sent) == 3 and not app.asking)
            assert len(swarm.sent[2]) == 1  # a new conversation
            assert "^N new" in str(app.query_one("#hints").render())

    asyncio.run(main())
