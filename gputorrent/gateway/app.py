"""An HTTP front to the swarm that OpenAI and Ollama clients already speak.

OpenAI: ``/v1/chat/completions``, ``/v1/completions`` (SSE when ``stream``), ``/v1/models``,
``/v1/models/{id}``. Ollama: ``/api/chat``, ``/api/generate`` (NDJSON, streaming unless
``"stream": false``; no prompt: the CLI's "load the model"), ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/pull`` (a model the swarm serves is present), ``/api/version``, and
``/api/embed`` answering that peers do not embed. Each request becomes one ``Swarm.stream``
call, so peer choice, failover and receipts are the same as for ``gputorrent ask``.

Errors come in each API's own shape, with the status codes clients act on: 400 a bad request
(and a field the swarm cannot honour, named: tools, logprobs, n, images). JSON mode and
``json_schema`` (Ollama's ``format``) become a grammar the serving peer samples under,
401 a missing or wrong key, 404 a model no peer serves or an unknown endpoint, 429 every peer
busy (with Retry-After), 503 no peer can answer, with Retry-After when the model was served
within ``RECENT_S`` (its donor restarting, say: clients must not conclude it does not exist).
The status is decided before the first byte of a stream, by waiting for the stream's first
event.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..api import AskFailed, Failover, Finished, Swarm, Text
from ..api.swarm import answer_of, params_from
from ..metrics import RequesterMetrics, exposition

STATUS = {"no_peers": 503, "unavailable": 503, "failed": 503, "unknown_model": 404, "busy": 429}
RECENT_S = 600.0  # a model served this recently and gone now is "unavailable" (503), not unknown (404)
RETRY_GONE_S = 10  # Retry-After for it: about a donor's restart


class BadRequest(Exception):
    pass


class NotFound(Exception):
    pass


class Unavailable(Exception):
    """A model with no live peer now that this gateway saw served within ``RECENT_S``."""


class NotImplementedHere(Exception):
    pass


# --- request parsing -------------------------------------------------------------------------


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _model(name: Any) -> str | None:
    """Ollama names carry a tag (``smollm2:latest``); the swarm knows aliases and model ids."""
    if name in (None, ""):
        return None
    if not isinstance(name, str):
        raise BadRequest("'model' must be a string")
    return name.removesuffix(":latest")


def _text_content(content: Any) -> str:
    """OpenAI content is a string or a list of parts; only text parts can be served."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise BadRequest("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise BadRequest("message content must be a string")


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list of {role, content}")
    out = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest("each message needs a role of system, user or assistant")
        out.append({"role": m["role"], "content": _text_content(m.get("content", ""))})
    return out


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise BadRequest("'stop' must be a string or a list of strings")


def _unsupported(body: dict[str, Any], fields: dict[str, str]) -> None:
    """400 naming the first field the swarm cannot honour, rather than an answer without it."""
    for name, why in fields.items():
        value = body.get(name)
        if value in (None, False, [], {}, ""):
            continue
        raise BadRequest(f"'{name}' is not supported by the gputorrent swarm: {why}")


_OPENAI_UNSUPPORTED = {
    "tools": "peers generate text only; no tool calls", "tool_choice": "peers generate text only; no tool calls",
    "functions": "peers generate text only; no function calls",
    "function_call": "peers generate text only; no function calls",
    "logprobs": "peers do not return log probabilities", "top_logprobs": "peers do not return log probabilities",
    "audio": "text only", "modalities": "text only", "prediction": "not supported",
}


def _grammar(value: Any, field: str) -> str | None:
    """The grammar for a requested output format (``response_format`` or Ollama's ``format``):
    JSON mode, or a JSON schema; the serving peer samples under it (asking/formats.py)."""
    from ..asking.formats import json_grammar

    if value in (None, "", {"type": "text"}):
        return None
    try:
        if value in ("json", {"type": "json_object"}):
            return json_grammar()
        if isinstance(value, dict) and value.get("type") == "json_schema":
            schema = (value.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest(f"'{field}': json_schema needs a 'schema' object")
            return json_grammar(schema)
        if isinstance(value, dict) and field == "format":  # Ollama: the schema itself
            return json_grammar(value)
    except ValueError as exc:
        raise BadRequest(f"'{field}': {exc}") from exc
    raise BadRequest(f"'{field}' must be text, json_object or json_schema (Ollama: \"json\" or a schema)")


def _openai_params(body: dict[str, Any]) -> dict[str, Any]:
    _unsupported(body, _OPENAI_UNSUPPORTED)
    if body.get("n", 1) not in (1, None):
        raise BadRequest("'n' must be 1: the swarm returns one choice per request")
    return {"grammar": _grammar(body.get("response_format"), "response_format"),
            "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "seed": body.get("seed"),
            "stop": _stop(body.get("stop"))}


def _ollama_params(body: dict[str, Any]) -> dict[str, Any]:
    _unsupported(body, {"tools": "no tool calls", "images": "peers serve text models only"})
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'options' must be an object")
    return {"grammar": _grammar(body.get("format"), "format"),
            "max_tokens": opts.get("num_predict"), "temperature": opts.get("temperature"),
            "top_p": opts.get("top_p"), "top_k": opts.get("top_k"), "seed": opts.get("seed"),
            "stop": _stop(opts.get("stop"))}


# --- the bridge from a swarm stream to HTTP ---------------------------------------------------


class _Started:
    """A swarm stream whose first event has arrived (so errors before it became a status)."""

    def __init__(self, events: AsyncIterator[Any], first: Any, metrics: RequesterMetrics, t0: float) -> None:
        self.events, self.first, self.metrics = events, first, metrics
        self.t0 = t0
        self._first_text = False

    def _observe(self, ev: Any) -> None:
        m = self.metrics
        if isinstance(ev, Text) and not self._first_text:
            self._first_text = True
            m.ttft.observe(time.perf_counter() - self.t0)
        elif isinstance(ev, Failover):
            m.failovers.inc()
        elif isinstance(ev, Finished):
            m.requests.labels("ok").inc()
            m.attempts.observe(max(1, len(ev.answer.attempts)))
            m.generated_tokens.inc(ev.answer.usage.get("completion_tokens", 0))

    async def __aiter__(self):
        async with aclosing(self.events):
            try:
                self._observe(self.first)
                yield self.first
                async for ev in self.events:
                    self._observe(ev)
                    yield ev
            except AskFailed as exc:
                self.metrics.requests.labels("busy" if exc.kind == "busy" else "failed").inc()
                raise

    async def collect(self) -> tuple[str, Any]:
        text: list[str] = []
        answer = await answer_of(self.__aiter__(), lambda t: text.append(t.text))
        return "".join(text), answer


async def _start(swarm: Swarm, metrics: RequesterMetrics, prompt: Any, **kw: Any) -> _Started:
    params = {k: v for k, v in kw.items() if v is not None}
    t0 = time.perf_counter()
    events = None
    try:
        params_from(**{k: v for k, v in params.items() if k not in ("model", "raw", "system")})  # 400 before lookups
        if "plan" not in params:  # choosing peers, timed apart from the answer
            params["plan"] = await swarm.rank(params.get("model"))
            metrics.lookup.observe(time.perf_counter() - t0)
        events = swarm.stream(prompt, **params)
        first = await events.__anext__()
    except BaseException as exc:
        if isinstance(exc, AskFailed):
            metrics.requests.labels("busy" if exc.kind == "busy" else "failed").inc()
        elif isinstance(exc, (ValueError, TypeError)):
            metrics.requests.labels("bad_request").inc()
        if events is not None:
            await events.aclose()
        raise
    assert events is not None
    return _Started(events, first, metrics, t0)


def _error_status(exc: AskFailed) -> int:
    return STATUS.get(exc.kind, 503)


def _retry_after(exc: AskFailed) -> dict[str, str]:
    return {"Retry-After": "1"} if exc.kind == "busy" else {}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _gt(answer: Any) -> dict[str, Any]:
    """What the swarm adds to a response: who answered, the signed receipt, the attempts."""
    return {"peer_id": answer.peer_id, "model_id": answer.model_id, "receipt": answer.receipt,
            "attempts": [{"peer_id": a.peer_id, "outcome": a.outcome, "tokens": a.tokens} for a in answer.attempts]}


# --- OpenAI -------------------------------------------------------------------------------------


def _openai_error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": kind}},
                        status_code=status, headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def make_app(swarm: Swarm, *, api_key: str | None = None, default_model: str | None = None,
             metrics: RequesterMetrics | None = None) -> Starlette:
    """The ASGI app over an entered ``Swarm`` (the caller owns its lifetime). ``/metrics``
    gives the requester side in Prometheus' text format (behind the API key, when one is set)."""
    metrics = metrics or RequesterMetrics()

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), api_key.encode())

    def guarded(handler: Callable, ollama: bool) -> Callable:
        async def endpoint(request: Request) -> Response:
            err = _ollama_error if ollama else _openai_error
            if not authorized(request):
                return err(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
            try:
                return await handler(request)
            except BadRequest as exc:
                return err(400, str(exc), "invalid_request_error")
            except ValueError as exc:  # the swarm's own checks of messages and parameters
                return err(400, str(exc), "invalid_request_error")
            except NotFound as exc:
                return err(404, str(exc), "model_not_found")
            except Unavailable as exc:
                return err(503, str(exc), "model_unavailable", {"Retry-After": str(RETRY_GONE_S)})
            except NotImplementedHere as exc:
                return err(501, str(exc), "not_implemented")
            except AskFailed as exc:
                if (gone := unavailable(asked.get(None), exc)) is not None:
                    return err(503, str(gone), "model_unavailable", {"Retry-After": str(RETRY_GONE_S)})
                return err(_error_status(exc), str(exc), exc.kind, _retry_after(exc))
        return endpoint

    recent: dict[str, float] = {}  # model name or id -> when a live peer last served it here
    asked: contextvars.ContextVar[str | None] = contextvars.ContextVar("asked")  # this request's model

    def unavailable(model: str | None, exc: AskFailed) -> Unavailable | None:
        """A failure for a model served here within ``RECENT_S``: say so, so clients retry."""
        when = recent.get(model or "")
        if exc.kind == "busy" or when is None or time.monotonic() - when >= RECENT_S:
            return None
        return Unavailable(f"no live peer serves {model!r} right now (one did {time.monotonic() - when:.0f} s ago, "
                           f"through this gateway); retry in a few seconds ({exc})")

    def saw(*names: str) -> None:
        now = time.monotonic()
        for name in names:
            if name:
                recent[name] = now

    async def start(prompt: Any, **kw: Any) -> _Started:
        """``_start``, remembering served models so that one gone for a moment is a 503."""
        model = kw.get("model")
        asked.set(model)
        try:
            started = await _start(swarm, metrics, prompt, **kw)
        except AskFailed as exc:
            if (gone := unavailable(model, exc)) is not None:
                raise gone from exc
            raise
        saw(model or "")
        return started

    async def find_model(name: str | None) -> Any:
        """The served model ``name`` means (alias, alias:latest, model id or its prefix), or 404."""
        name = _model(name)
        if not name:
            raise BadRequest("'model' is required")
        for m in await models_in_swarm():
            if name in (m.alias, m.model_id) or (len(name) >= 8 and m.model_id.startswith(name)):
                return m
        if name in recent and time.monotonic() - recent[name] < RECENT_S:
            raise Unavailable(f"no live peer serves {name!r} right now; retry in a few seconds")
        raise NotFound(f"model '{name}' not found: no live peer in the swarm serves it")

    async def models_in_swarm() -> list[Any]:
        seen: dict[str, Any] = {}
        for p in await swarm.peers():
            for m in p.advert.models:
                seen.setdefault(m.alias, m)
        for m in seen.values():
            saw(m.alias, m.model_id)
        return list(seen.values())

    async def prometheus(request: Request) -> Response:
        body, ctype = exposition(metrics.registry)
        return Response(body, media_type=ctype)

    # OpenAI
    async def v1_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": m.alias, "object": "model", "created": 0, "owned_by": "gputorrent", "model_id": m.model_id}
            for m in await models_in_swarm()]})

    async def v1_model(request: Request) -> Response:
        m = await find_model(request.path_params["model"])
        return JSONResponse({"id": m.alias, "object": "model", "created": 0, "owned_by": "gputorrent",
                             "model_id": m.model_id})

    async def v1_chat(request: Request) -> Response:
        body = await _body(request)
        model = _model(body.get("model")) or default_model
        started = await start(_messages(body.get("messages")), model=model, **_openai_params(body))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            text, answer = await started.collect()
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": model or answer.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": _finish(answer.finish_reason)}],
                "usage": _usage(answer), "system_fingerprint": answer.peer_id, "gputorrent": _gt(answer)})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[str]:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model or ""}
            yield _sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
            async for ev in _guard_stream(started, lambda e: _sse({"error": {"message": e, "type": "swarm_error"}})):
                if isinstance(ev, str):
                    yield ev
                elif isinstance(ev, Text):
                    yield _sse(head | {"choices": [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None}]})
                elif isinstance(ev, Finished):
                    yield _sse(head | {"choices": [{"index": 0, "delta": {},
                                                    "finish_reason": _finish(ev.answer.finish_reason)}],
                                       "gputorrent": _gt(ev.answer)})
                    if include_usage:
                        yield _sse(head | {"choices": [], "usage": _usage(ev.answer)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def v1_completions(request: Request) -> Response:
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
        model = _model(body.get("model")) or default_model
        started = await start(prompt, raw=True, model=model, **_openai_params(body))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            text, answer = await started.collect()
            return JSONResponse({
                "id": rid, "object": "text_completion", "created": created, "model": model or answer.model_id,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": _finish(answer.finish_reason)}],
                "usage": _usage(answer), "gputorrent": _gt(answer)})

        async def chunks() -> AsyncIterator[str]:
            head = {"id": rid, "object": "text_completion", "created": created, "model": model or ""}
            async for ev in _guard_stream(started, lambda e: _sse({"error": {"message": e, "type": "swarm_error"}})):
                if isinstance(ev, str):
                    yield ev
                elif isinstance(ev, Text):
                    yield _sse(head | {"choices": [{"index": 0, "text": ev.text, "logprobs": None,
                                                    "finish_reason": None}]})
                elif isinstance(ev, Finished):
                    yield _sse(head | {"choices": [{"index": 0, "text": "", "logprobs": None,
                                                    "finish_reason": _finish(ev.answer.finish_reason)}],
                                       "usage": _usage(ev.answer), "gputorrent": _gt(ev.answer)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # Ollama
    async def api_tags(request: Request) -> Response:
        return JSONResponse({"models": [
            {"name": f"{m.alias}:latest", "model": f"{m.alias}:latest", "modified_at": _now_iso(), "size": 0,
             "digest": m.model_id, "details": {"format": "gguf", "family": "", "parameter_size": "",
                                               "quantization_level": m.quantization}}
            for m in await models_in_swarm()]})

    async def api_version(request: Request) -> Response:
        return JSONResponse({"version": f"0.0.0-gputorrent-{__version__}"})

    def _details(m: Any) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": "", "families": None, "parameter_size": "",
                "quantization_level": m.quantization}

    async def api_show(request: Request) -> Response:
        body = await _body(request)
        m = await find_model(body.get("model") or body.get("name"))
        return JSONResponse({
            "license": "", "modelfile": f"# served by the gputorrent swarm\nFROM {m.alias}\n", "parameters": "",
            "template": "{{ .Prompt }}", "details": _details(m), "modified_at": _now_iso(),
            "model_info": {"general.architecture": "", "general.context_length": m.context_length,
                           "gputorrent.model_id": m.model_id},
            "capabilities": ["completion"]})

    async def api_ps(request: Request) -> Response:
        return JSONResponse({"models": [
            {"name": f"{m.alias}:latest", "model": f"{m.alias}:latest", "size": 0, "size_vram": 0,
             "digest": m.model_id, "details": _details(m), "context_length": m.context_length,
             "expires_at": datetime.fromtimestamp(time.time() + 300, UTC).isoformat().replace("+00:00", "Z")}
            for m in await models_in_swarm()]})

    async def api_pull(request: Request) -> Response:
        """A model the swarm serves is there already: pull succeeds without a download (a
        donor fetches files with ``gputorrent models pull``; this gateway only asks)."""
        body = await _body(request)
        m = await find_model(body.get("model") or body.get("name"))
        steps = [{"status": f"{m.alias} is served by the gputorrent swarm: nothing to download"},
                 {"status": "verifying sha256 digest", "digest": f"sha256:{m.model_id}"}, {"status": "success"}]
        if body.get("stream") is False:
            return JSONResponse(steps[-1])

        async def lines() -> AsyncIterator[str]:
            for step in steps:
                yield json.dumps(step) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def api_embed(request: Request) -> Response:
        body = await _body(request)
        name = _model(body.get("model")) or default_model or "the model"
        raise NotImplementedHere(f"{name!r} does not support embeddings here: gputorrent peers serve text "
                                 "generation only; use a local embedding model")

    async def api_generate(request: Request) -> Response:
        body = await _body(request)
        prompt = body.get("prompt")
        model = _model(body.get("model")) or default_model
        if prompt in (None, "") and not body.get("images"):  # the ollama CLI's "load the model" request
            m = await find_model(model)
            loaded = {"model": model or m.alias, "created_at": _now_iso(), "response": "", "done": True,
                      "done_reason": "load"}
            if body.get("stream") is False:
                return JSONResponse(loaded)
            return Response(json.dumps(loaded) + "\n", media_type="application/x-ndjson")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string")
        raw = bool(body.get("raw"))
        system = body.get("system") if isinstance(body.get("system"), str) else None
        started = await start(prompt, model=model, raw=raw, system=None if raw else system,
                               **_ollama_params(body))
        return await _ollama_reply(started, body, model, lambda text: {"response": text})

    async def api_chat(request: Request) -> Response:
        body = await _body(request)
        model = _model(body.get("model")) or default_model
        started = await start(_messages(body.get("messages")), model=model, **_ollama_params(body))
        return await _ollama_reply(started, body, model,
                                   lambda text: {"message": {"role": "assistant", "content": text}})

    routes = [
        Route("/v1/models", guarded(v1_models, False), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(v1_model, False), methods=["GET"]),
        Route("/v1/chat/completions", guarded(v1_chat, False), methods=["POST"]),
        Route("/v1/completions", guarded(v1_completions, False), methods=["POST"]),
        Route("/api/tags", guarded(api_tags, True), methods=["GET"]),
        Route("/api/version", guarded(api_version, True), methods=["GET"]),
        Route("/api/generate", guarded(api_generate, True), methods=["POST"]),
        Route("/api/chat", guarded(api_chat, True), methods=["POST"]),
        Route("/api/show", guarded(api_show, True), methods=["POST"]),
        Route("/api/ps", guarded(api_ps, True), methods=["GET"]),
        Route("/api/pull", guarded(api_pull, True), methods=["POST"]),
        Route("/api/embed", guarded(api_embed, True), methods=["POST"]),
        Route("/api/embeddings", guarded(api_embed, True), methods=["POST"]),
        Route("/metrics", guarded(prometheus, False), methods=["GET"]),
        Route("/", lambda r: Response("gputorrent gateway is running\n"), methods=["GET", "HEAD"]),
        Route("/api/{rest:path}", lambda r: _ollama_error(404, f"unknown endpoint {r.url.path}: this gateway "
                                                          "serves chat, generate, tags, show, ps, pull, version",
                                                          "not_found"), methods=["GET", "POST", "DELETE", "HEAD"]),
        Route("/v1/{rest:path}", lambda r: _openai_error(404, f"unknown endpoint {r.url.path}: this gateway serves "
                                                         "chat/completions, completions, models", "not_found"),
              methods=["GET", "POST", "DELETE"]),
    ]
    return Starlette(routes=routes)


def _finish(reason: str) -> str:
    return "length" if reason in ("length", "deadline") else "stop"


def _usage(answer: Any) -> dict[str, int]:
    p, c = answer.usage.get("prompt_tokens", 0), answer.usage.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _guard_stream(started: _Started, render_error: Callable[[str], str]) -> AsyncIterator[Any]:
    """The stream's events; a failure after the first byte becomes one error item (the status
    is already sent), rather than a cut connection."""
    try:
        async for ev in started:
            if not isinstance(ev, Failover):
                yield ev
    except AskFailed as exc:
        yield render_error(str(exc))


def _ollama_error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _ollama_reply(started: _Started, body: dict[str, Any], model: str | None,
                        piece: Callable[[str], dict[str, Any]]) -> Response:
    name = f"{model or ''}"

    def final(answer: Any, text: str) -> dict[str, Any]:
        elapsed = int((time.perf_counter() - started.t0) * 1e9)
        evals = answer.usage.get("completion_tokens", 0)
        # Ollama's clients compute tokens/s as eval_count / eval_duration: the time from the
        # first token to the last, as the peer measured it; the prompt's time is to the first.
        prompt_ns = int(answer.ttft_ms * 1e6)
        eval_ns = int((evals - 1) / answer.tokens_per_s * 1e9) if evals > 1 and answer.tokens_per_s > 0 else 0
        return {"model": name or answer.model_id, "created_at": _now_iso(), **piece(text), "done": True,
                "done_reason": _finish(answer.finish_reason), "total_duration": elapsed, "load_duration": 0,
                "prompt_eval_count": answer.usage.get("prompt_tokens", 0), "prompt_eval_duration": prompt_ns,
                "eval_count": evals, "eval_duration": max(eval_ns, 1) if evals else 0, "gputorrent": _gt(answer)}

    if body.get("stream") is False:
        text, answer = await started.collect()
        return JSONResponse(final(answer, text))

    async def lines() -> AsyncIterator[str]:
        async for ev in _guard_stream(started, lambda e: json.dumps({"error": e}) + "\n"):
            if isinstance(ev, str):
                yield ev
            elif isinstance(ev, Text):
                yield json.dumps({"model": name, "created_at": _now_iso(), **piece(ev.text), "done": False}) + "\n"
            elif isinstance(ev, Finished):
                yield json.dumps(final(ev.answer, "")) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")
