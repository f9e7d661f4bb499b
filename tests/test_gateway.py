"""The gateway, driven by the official ``openai`` and ``ollama`` clients against real swarms.

Three small swarms: a healthy one (two peers), one whose only peer is always busy (behind a
gateway that wants an API key), and one with no serving peer at all.
"""

import signal
import time

import httpx
import ollama
import openai
import pytest

from .conftest import QUESTION

KEY = "test-key-not-a-secret"


def _wait_for_model(url: str, headers: dict | None = None, timeout: float = 30) -> None:
    """Polls the gateway's model list until the swarm's adverts reach it (another process's
    DHT state: nothing to await across processes); bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        if r.status_code == 200 and r.json()["data"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"no model appeared at {url} within {timeout}s")


@pytest.fixture(scope="module")
def gateways(swarm):
    boot = swarm.bootstrap("gw-boot")
    for name in ("gw-a", "gw-b"):
        swarm.spawn(name, "--bootstrap", boot.addr, "--ctx", "1024", "--rate-limit", "0")
    busy_boot = swarm.bootstrap("busy-boot")
    swarm.spawn("busy", "--bootstrap", busy_boot.addr, "--ctx", "512", "--fault", "busy")
    for name in ("gw-a", "gw-b", "busy"):
        swarm.peers[name].wait_ready(120)
    empty_boot = swarm.bootstrap("empty-boot")
    open_gw = swarm.gateway("gw-open", "--bootstrap", boot.addr)
    locked = swarm.gateway("gw-locked", "--bootstrap", busy_boot.addr, "--api-key", KEY)
    empty = swarm.gateway("gw-empty", "--bootstrap", empty_boot.addr)
    _wait_for_model(open_gw.addr)
    _wait_for_model(locked.addr, {"Authorization": f"Bearer {KEY}"})
    return {"open": open_gw.addr, "locked": locked.addr, "empty": empty.addr}


@pytest.fixture(scope="module")
def oa(gateways):
    return openai.OpenAI(base_url=gateways["open"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_chat_completion(oa):
    r = oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                   temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.model == "smollm2" and r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10
    gt = r.model_extra["gputorrent"]  # who answered, and the receipt it signed
    assert len(gt["receipt"]) == 64 and gt["attempts"][-1]["outcome"] == "ok"


def test_openai_chat_streaming(oa):
    chunks = list(oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                             temperature=0, max_tokens=16, stream=True,
                                             stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and chunks[-1].usage.completion_tokens >= 1


def test_openai_completions_and_models(oa):
    r = oa.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=4)
    assert "Paris" in r.choices[0].text
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=4, stream=True))
    assert streamed == r.choices[0].text  # greedy: streaming or not, the same tokens
    assert [m.id for m in oa.models.list()] == ["smollm2"]


def test_openai_errors_have_the_codes_clients_expect(oa, gateways):
    with pytest.raises(openai.NotFoundError, match="no live peer serves 'gpt-4'"):
        oa.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], temperature=99)
    with pytest.raises(openai.BadRequestError, match="messages"):
        oa.chat.completions.create(model="smollm2", messages=[])
    bad = httpx.post(gateways["open"] + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and "error" in bad.json()

    locked = gateways["locked"] + "/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked, api_key="wrong", max_retries=0).models.list()
    busy = openai.OpenAI(base_url=locked, api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as exc:
        busy.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.response.headers["retry-after"] == "1"

    empty = openai.OpenAI(base_url=gateways["empty"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as exc:
        empty.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 503 and "no peer in the swarm serves any model" in str(exc.value)


def test_ollama_chat_generate_and_tags(gateways):
    client = ollama.Client(host=gateways["open"], timeout=60)
    opts = {"temperature": 0, "num_predict": 16}
    r = client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}], options=opts)
    assert "Paris" in r.message.content and r.done and r.eval_count >= 1
    parts = list(client.chat(model="smollm2:latest", messages=[{"role": "user", "content": QUESTION}],
                             options=opts, stream=True))
    assert "Paris" in "".join(p.message.content for p in parts) and parts[-1].done and not parts[0].done
    g = client.generate(model="smollm2", prompt="The capital of France is", raw=True, options={"temperature": 0,
                                                                                              "num_predict": 4})
    assert "Paris" in g.response
    assert [m.model for m in client.list().models] == ["smollm2:latest"]
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404


def test_ollama_errors_on_the_locked_and_empty_gateways(gateways):
    with pytest.raises(ollama.ResponseError) as exc:
        ollama.Client(host=gateways["locked"]).generate(model="smollm2", prompt="hi")
    assert exc.value.status_code == 401
    authed = ollama.Client(host=gateways["locked"], headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(ollama.ResponseError) as exc:
        authed.generate(model="smollm2", prompt="hi", stream=False)
    assert exc.value.status_code == 429
    with pytest.raises(ollama.ResponseError) as exc:
        ollama.Client(host=gateways["empty"]).generate(model="smollm2", prompt="hi")
    assert exc.value.status_code == 503


def test_ctrl_c_stops_the_gateway_cleanly(swarm):
    gw = swarm.gateway("gw-sigint", "--bootstrap", swarm.peers["gw-boot"].addr)
    assert httpx.get(gw.addr + "/", timeout=10).status_code == 200
    assert gw.stop(signal.SIGINT, timeout=15) == 0
    assert not gw.ready_file.exists() and "Traceback" not in gw.stderr()


def test_a_port_in_use_is_a_clear_error(gateways, swarm, cli):
    port = gateways["open"].rsplit(":", 1)[1]  # the open gateway holds it
    done = cli("gateway", "--no-mdns", "--bootstrap", swarm.peers["gw-boot"].addr, "--port", port, timeout=60)
    assert done.returncode == 1 and f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_absurd_requests_are_refused_and_the_gateway_keeps_serving(gateways, oa):
    url = gateways["open"]
    huge = httpx.post(url + "/api/generate", json={"model": "smollm2", "prompt": "x " * 1_500_000, "stream": False},
                      timeout=60)
    assert huge.status_code == 400 and "error" in huge.json(), huge.text[:300]
    for body in ({"model": "smollm2", "prompt": "hi", "options": {"num_predict": 10**9}},
                 {"model": 7, "prompt": "hi"}, {"model": "smollm2", "messages": [{"role": "robot", "content": "x"}]},
                 [1, 2, 3]):
        path = "/api/chat" if isinstance(body, dict) and "messages" in body else "/api/generate"
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), (body, r.text)
    r = oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                   temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].message.content


def test_metrics_of_the_requester_side(gateways, oa):
    """The gateway's /metrics, read by Prometheus' own parser after answers and refusals."""
    from prometheus_client.parser import text_string_to_metric_families

    oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=-3)
    text = httpx.get(gateways["open"] + "/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("gputorrent_gateway_requests_total", (("outcome", "ok"),))] >= 1
    assert samples[("gputorrent_gateway_requests_total", (("outcome", "bad_request"),))] >= 1
    assert samples[("gputorrent_gateway_peer_choice_seconds_count", ())] >= 1
    assert samples[("gputorrent_gateway_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("gputorrent_gateway_attempts_count", ())] >= 1
    locked = httpx.get(gateways["locked"] + "/metrics", timeout=10)
    assert locked.status_code == 401  # behind the API key, like every other route


def _ndjson(r: httpx.Response) -> list[dict]:
    import json

    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def test_the_ollama_cli_request_sequences_for_run_list_ps_show_and_pull(gateways):
    """What ollama's own CLI sends (cmd/cmd.go: checkServerHeartbeat, showOrPullModel,
    loadOrUnloadModel, then chat; ListHandler, ListRunningHandler, ShowHandler, PullHandler),
    request for request, over plain HTTP."""
    with httpx.Client(base_url=gateways["open"], timeout=60) as http:
        # ollama run smollm2 (interactive): heartbeat, show, load, chat.
        assert http.head("/").status_code == 200
        shown = http.post("/api/show", json={"model": "smollm2"})
        assert shown.status_code == 200 and "completion" in shown.json()["capabilities"]
        loaded = _ndjson(http.post("/api/generate", json={"model": "smollm2", "keep_alive": "5m"}))
        assert loaded[-1]["done"] is True and loaded[-1]["response"] == ""
        chat = _ndjson(http.post("/api/chat", json={"model": "smollm2", "stream": True, "options": {"temperature": 0},
                                                    "messages": [{"role": "user", "content": QUESTION}]}))
        assert "Paris" in "".join(c["message"]["content"] for c in chat) and chat[-1]["done"]
        assert chat[-1]["eval_count"] > 0 and chat[-1]["eval_duration"] > 0 and chat[-1]["prompt_eval_duration"] > 0
        # ollama run llama3: show says 404, so the CLI pulls; the pull fails in Ollama's shape.
        missing = http.post("/api/show", json={"model": "llama3"})
        assert missing.status_code == 404 and "llama3" in missing.json()["error"]
        pulled = http.post("/api/pull", json={"model": "llama3", "stream": True})
        assert pulled.status_code == 404 and "error" in pulled.json()
        # ollama list / ps / show / pull smollm2
        assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["smollm2:latest"]
        running = http.get("/api/ps").json()["models"]
        assert [m["name"] for m in running] == ["smollm2:latest"] and running[0]["digest"]
        assert http.post("/api/show", json={"model": "smollm2:latest"}).json()["details"]["format"] == "gguf"
        steps = _ndjson(http.post("/api/pull", json={"model": "smollm2", "stream": True}))
        assert steps[-1] == {"status": "success"}
        # Anything else under /api or /v1 is a 404 in that API's shape, never a bare "Not Found".
        assert http.post("/api/copy", json={}).json()["error"].startswith("unknown endpoint")
        assert http.get("/v1/files").json()["error"]["code"] == "not_found"


def test_ollama_and_openai_clients_on_the_endpoints_they_call_and_fields_they_cannot_have(gateways, oa):
    client = ollama.Client(host=gateways["open"], timeout=60)
    assert client.show("smollm2").details.quantization_level
    assert [m.model for m in client.ps().models] == ["smollm2:latest"]
    assert client.pull("smollm2").status == "success"
    with pytest.raises(ollama.ResponseError, match="embeddings") as exc:
        client.embed(model="smollm2", input="hello")
    assert exc.value.status_code == 501
    r = client.generate(model="smollm2", prompt=QUESTION, options={"temperature": 0, "num_predict": 8})
    assert r.eval_count and r.eval_duration and r.prompt_eval_duration and r.load_duration == 0

    assert oa.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4")
    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kw, field in (({"tools": [tool]}, "tools"), ({"logprobs": True}, "logprobs"), ({"n": 2}, "'n'"),
                      ({"response_format": {"type": "xml"}}, "response_format")):
        with pytest.raises(openai.BadRequestError, match=field):
            oa.chat.completions.create(model="smollm2", messages=hi, **kw)
    ok = oa.chat.completions.create(model="smollm2", messages=hi, max_tokens=2, response_format={"type": "text"})
    assert ok.choices[0].message.content is not None


def test_a_model_whose_only_donor_restarts_is_unavailable_not_unknown(swarm):
    """Its donor gone for a moment, a model this gateway served is a 503 with Retry-After (clients
    retry), not a 404 (clients conclude it does not exist); a model never seen stays a 404."""
    boot = swarm.bootstrap("gone-boot")
    donor = swarm.start("gone-donor", "--bootstrap", boot.addr, "--ctx", "512")
    gw = swarm.gateway("gw-gone", "--bootstrap", boot.addr)
    _wait_for_model(gw.addr)
    oa = openai.OpenAI(base_url=gw.addr + "/v1", api_key="unused", max_retries=0, timeout=60)
    hi = [{"role": "user", "content": "hi"}]
    assert oa.chat.completions.create(model="smollm2", messages=hi, max_tokens=2).choices
    donor.stop()  # it announces that it is leaving
    with pytest.raises(openai.APIStatusError) as exc:
        oa.chat.completions.create(model="smollm2", messages=hi, max_tokens=2)
    assert exc.value.status_code == 503 and exc.value.response.headers.get("retry-after") == "10", (exc.value.status_code, exc.value.response.text)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4", messages=hi, max_tokens=2)


def test_json_mode_and_json_schema_answers_are_valid_json(gateways, oa):
    """The grammar travels to the serving peer, which samples under it: whatever the 135M model
    would say, the answer parses, and under a schema it has the schema's shape."""
    import json

    ask = [{"role": "user", "content": "What is the capital of France? Reply in JSON."}]
    got = oa.chat.completions.create(model="smollm2", messages=ask, max_tokens=48, temperature=0,
                                     response_format={"type": "json_object"})
    assert isinstance(json.loads(got.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["capital", "population"], "additionalProperties": False}
    got = oa.chat.completions.create(model="smollm2", messages=ask, max_tokens=64, temperature=0,
                                     response_format={"type": "json_schema",
                                                      "json_schema": {"name": "city", "schema": schema}})
    value = json.loads(got.choices[0].message.content)
    assert set(value) == {"capital", "population"}
    assert isinstance(value["capital"], str) and len(value["capital"]) <= 20 and isinstance(value["population"], int)
    client = ollama.Client(host=gateways["open"], timeout=60)
    r = client.chat(model="smollm2", messages=ask, format="json", options={"temperature": 0, "num_predict": 48})
    assert isinstance(json.loads(r.message.content), dict)
    r = client.generate(model="smollm2", prompt="A city as JSON:", format=schema,
                        options={"temperature": 0, "num_predict": 64})
    assert set(json.loads(r.response)) == {"capital", "population"}
