"""An HTTP front to the swarm that OpenAI and Ollama clients already speak.

OpenAI: ``/v1/chat/completions``, ``/v1/completions`` (SSE when ``stream``), ``/v1/models``.
Ollama: ``/api/chat``, ``/api/generate`` (NDJSON, streaming unless ``"stream": false``),
``/api/tags``, ``/api/version``. Each request becomes one ``Swarm.stream`` call, so peer
choice, failover and receipts are the same as for ``gputorrent ask``.

Errors come in each API's own shape, with the status codes clients act on: 400 a bad request,
401 a missing or wrong key, 404 a model no peer serves, 429 every peer busy (with
Retry-After), 503 no peer can answer. The status is decided before the first byte of a
stream, by waiting for the stream's first event.
"""

from __future__ import annotations

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


class BadRequest(Exception):
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


def _openai_params(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    return {"max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "seed": body.get("seed"),
            "stop": _stop(body.get("stop"))}


def _ollama_params(body: dict[str, Any]) -> dict[str, Any]:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'options' must be an object")
    return {"max_tokens": opts.get("num_predict"), "temperature": opts.get("temperature"),
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
            except AskFailed as exc:
                return err(_error_status(exc), str(exc), exc.kind, _retry_after(exc))
        return endpoint

    async def models_in_swarm() -> list[Any]:
        seen: dict[str, Any] = {}
        for p in await swarm.peers():
            for m in p.advert.models:
                seen.setdefault(m.alias, m)
        return list(seen.values())

    async def prometheus(request: Request) -> Response:
        body, ctype = exposition(metrics.registry)
        return Response(body, media_type=ctype)

    # OpenAI
    async def v1_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": m.alias, "object": "model", "created": 0, "owned_by": "gputorrent", "model_id": m.model_id}
            for m in await models_in_swarm()]})

    async def v1_chat(request: Request) -> Response:
        body = await _body(request)
        model = _model(body.get("model")) or default_model
        started = await _start(swarm, metrics, _messages(body.get("messages")), model=model, **_openai_params(body))
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
        started = await _start(swarm, metrics, prompt, raw=True, model=model, **_openai_params(body))
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

    async def api_generate(request: Request) -> Response:
        body = await _body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
        model = _model(body.get("model")) or default_model
        raw = bool(body.get("raw"))
        system = body.get("system") if isinstance(body.get("system"), str) else None
        started = await _start(swarm, metrics, prompt, model=model, raw=raw, system=None if raw else system,
                               **_ollama_params(body))
        return await _ollama_reply(started, body, model, lambda text: {"response": text})

    async def api_chat(request: Request) -> Response:
        body = await _body(request)
        model = _model(body.get("model")) or default_model
        started = await _start(swarm, metrics, _messages(body.get("messages")), model=model, **_ollama_params(body))
        return await _ollama_reply(started, body, model,
                                   lambda text: {"message": {"role": "assistant", "content": text}})

    routes = [
        Route("/v1/models", guarded(v1_models, False), methods=["GET"]),
        Route("/v1/chat/completions", guarded(v1_chat, False), methods=["POST"]),
        Route("/v1/completions", guarded(v1_completions, False), methods=["POST"]),
        Route("/api/tags", guarded(api_tags, True), methods=["GET"]),
        Route("/api/version", guarded(api_version, True), methods=["GET"]),
        Route("/api/generate", guarded(api_generate, True), methods=["POST"]),
        Route("/api/chat", guarded(api_chat, True), methods=["POST"]),
        Route("/metrics", guarded(prometheus, False), methods=["GET"]),
        Route("/", lambda r: Response("gputorrent gateway is running\n"), methods=["GET", "HEAD"]),
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
        return {"model": name or answer.model_id, "created_at": _now_iso(), **piece(text), "done": True,
                "done_reason": _finish(answer.finish_reason), "total_duration": elapsed,
                "prompt_eval_count": answer.usage.get("prompt_tokens", 0),
                "eval_count": answer.usage.get("completion_tokens", 0), "gputorrent": _gt(answer)}

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
