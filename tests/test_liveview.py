"""What serve prints while it runs: the status line and the per-event lines (the JSON log is
checked against a real serve process in test_devices.py)."""

import io
import json

from gputorrent.liveview import StatusView, event_line, status_line

STATUS = {"served": 12, "refused": 1, "failed": 0, "tokens": 900, "active": 3, "queued": 2, "slots": 4,
          "tokens_per_s_now": 141.6, "tokens_per_s": 88.2}


def test_status_line_says_what_an_operator_watches():
    line = status_line(STATUS)
    assert line.startswith("3/4 slots busy, 2 queued · 142 tok/s now, 88/stream")
    assert "12 served, 1 refused, 0 failed · 900 tokens" in line


def test_event_lines_for_answers_and_refusals_only():
    who = "12D3KooWAbCdEfGhIjKlMn"
    done = {"event": "done", "requester": who, "completion_tokens": 40, "tokens_per_s": 95.0, "ttft_ms": 80.0,
            "finish_reason": "length"}
    assert event_line(done) == "answered …EfGhIjKlMn: 40 tokens, 95 tokens/s, first token 80 ms (length)"
    assert event_line({"event": "busy", "requester": who, "reason": "4 active, 8 queued"}).startswith("busy for")
    assert "not_allowed" in event_line({"event": "refused", "requester": who, "code": "not_allowed", "reason": "x"})
    assert event_line({"event": "accepted", "requester": who}) is None


def test_json_log_is_one_object_per_line():
    out = io.StringIO()
    view = StatusView(json_log=True, live=True, out=out)
    view.ready({"peer_id": "p"}, "ignored in json")
    view.event({"event": "done", "requester": "r"})
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["ready", "done"] and lines[0]["peer_id"] == "p"
