"""The mesh beside llama.cpp's own server, in one run: what a user would run instead.

Builds ``llama-server`` from the llama.cpp sources inside the llama-cpp-python sdist of the
pinned version (once; cached in the user cache, ~12 min on 2 cores), then alternates rounds:
``llama-server -np 8 -c 16384 -t 2`` and one ``gputorrent serve --slots 8 --ctx 2048
--threads 2`` reached through ``gputorrent gateway`` (the same OpenAI streaming client) and
through the Python API. Measures 1 and 8 streams (tokens/s including the first token, time to
first token p50/p95), a repeated 500-token system prompt, and a cold ``gputorrent ask``.

Run: ``make bench-anchor`` (not part of ``make test``: it builds a C++ server).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openai
from _report import machine, median, pct, write_section

from gputorrent.config import load_settings
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.models import pull

VERSION = "0.3.36"  # llama-cpp-python, pinned in pyproject.toml: the same llama.cpp on both sides
TOKENS = 160
SYSTEM = ("You are a careful assistant. " * 90).strip()  # ~500 tokens


def build_server(cache: Path) -> Path:
    """``llama-server`` of the pinned llama.cpp, built once into ``cache`` with the ggml flags
    the wheel was built with (``CMAKE_ARGS``, set by ``make bench-anchor``): like for like."""
    flags = os.environ.get("CMAKE_ARGS", "").split()
    tag = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8]
    exe = cache / f"llama-server-{VERSION}-{tag}"
    if exe.is_file():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="anchor-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        print(f"building llama-server {VERSION} (once, ~12 min on 2 cores)…", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", *flags],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
        shutil.copy2(build / "bin" / "llama-server", exe)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(exe: Path, model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(exe), "-m", str(model), "-np", "8", "-c", "16384", "-t", "2", "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama-server did not start")


def prompt(i: int) -> str:
    start = 100 * (i + 1)
    return f"Count upwards one by one: {start}, {start + 1}, {start + 2},"


def one_stream(client: openai.OpenAI, text: str, system: str | None = None, max_tokens: int = TOKENS) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    t0 = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=max_tokens,
                                                temperature=0.7, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft_ms": ((first or end) - t0) * 1000, "tokens": tokens, "s": end - t0}


def streams(client: openai.OpenAI, n: int, offset: int) -> dict:
    """``n`` streams at once: aggregate tokens/s over the wave, each stream's first token."""
    out: list[dict] = []
    threads = [threading.Thread(target=lambda i=i: out.append(one_stream(client, prompt(offset + i))))
               for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tok_s": sum(r["tokens"] for r in out) / wall, "ttft": [r["ttft_ms"] for r in out],
            "per_stream_tok_s": [r["tokens"] / r["s"] for r in out]}


def api_streams(addr: str, n: int, offset: int) -> dict:
    """The same through the Python API (``Swarm.stream``), one process, no HTTP."""
    import trio

    from gputorrent import Swarm
    from gputorrent.api import Finished, Text

    out: list[dict] = []

    async def main() -> float:
        async with Swarm(peers=[addr], mdns=False, data_dir=tempfile.mkdtemp()) as swarm:
            async def one(i: int) -> None:
                t0 = time.perf_counter()
                first = None
                async for ev in swarm.stream(prompt(offset + i), max_tokens=TOKENS, temperature=0.7):
                    if isinstance(ev, Text) and first is None:
                        first = time.perf_counter()
                    elif isinstance(ev, Finished):
                        end = time.perf_counter()
                        out.append({"ttft_ms": ((first or end) - t0) * 1000,
                                    "tokens": ev.answer.usage["completion_tokens"], "s": end - t0})

            await swarm.generate("Hi", max_tokens=2)  # warm: connection and peer choice
            t = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
            return time.perf_counter() - t

    wall = trio.run(main)
    return {"tok_s": sum(r["tokens"] for r in out) / wall, "ttft": [r["ttft_ms"] for r in out],
            "per_stream_tok_s": [r["tokens"] / r["s"] for r in out]}


def cold_asks(boot: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gputorrent", "ask", "Hi", "--bootstrap", boot, "--no-mdns",
                        "--max-tokens", "1", "--spot-check", "0", "--no-agent"],  # cold: in-process, no agent
                       check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    settings = load_settings()
    model, _ = pull("smollm2", settings.models_dir)
    exe = build_server(settings.cache_dir / "anchor")
    rows: dict[str, dict[str, list]] = {k: {} for k in ("llama-server", "gateway", "api")}

    def add(side: str, key: str, value) -> None:
        rows[side].setdefault(key, []).extend(value if isinstance(value, list) else [value])

    with LocalSwarm(env={**os.environ}) as swarm:
        boot = swarm.bootstrap()
        peer = swarm.start("anchor", "--slots", "8", "--ctx", "2048", "--threads", "2", "--bootstrap", boot.addr,
                           "--rate-limit", "0")
        gw = swarm.gateway("gateway", "--bootstrap", boot.addr, "--model", "smollm2")
        server, url = start_llama_server(exe, model)
        try:
            clients = {"llama-server": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                                     timeout=300),
                       "gateway": openai.OpenAI(base_url=gw.addr + "/v1", api_key="none", max_retries=0,
                                                timeout=300)}
            for c in clients.values():  # warm both: first graphs, connections, the gateway's view
                one_stream(c, "Hi", max_tokens=4)
            for r in range(args.rounds):
                for side, c in clients.items():
                    for i in range(3):
                        res = one_stream(c, prompt(10 * r + i))
                        add(side, "ttft1", res["ttft_ms"])
                        add(side, "tok_s1", res["tokens"] / res["s"])
                    wave = streams(c, 8, 100 * r)
                    add(side, "tok_s8", wave["tok_s"])
                    add(side, "ttft8", wave["ttft"])
                wave = api_streams(peer.addr, 8, 100 * r)
                add("api", "tok_s8", wave["tok_s"])
                add("api", "ttft8", wave["ttft"])
                for side, c in clients.items():  # a repeated 500-token system prompt
                    first = one_stream(c, f"Say {r}.", system=SYSTEM + f" Round {r}.", max_tokens=8)
                    second = one_stream(c, f"Say {r + 1}.", system=SYSTEM + f" Round {r}.", max_tokens=8)
                    add(side, "prefix_ratio", second["ttft_ms"] / first["ttft_ms"])
            rows["gateway"]["cold_ask_s"] = cold_asks(boot.addr, 5)
        finally:
            server.terminate()
            server.wait(10)
    ls, gwr, api = rows["llama-server"], rows["gateway"], rows["api"]
    m = lambda side, k: median(side.get(k, []))  # noqa: E731
    body = f"""## The mesh beside llama.cpp's server (`benchmarks/anchor.py`)

{machine()}. `llama-server` {VERSION}'s llama.cpp, built from the llama-cpp-python sdist, `-np 8 -c 16384
-t 2`, against one `gputorrent serve --slots 8 --ctx 2048 --threads 2`, through `gputorrent gateway`
(the same OpenAI streaming client) and through the Python API; {TOKENS} tokens per stream at temperature
0.7, {args.rounds} alternating rounds (medians over rounds; p95 over every stream).

| | llama-server | gputorrent (gateway) | ratio | gputorrent (API) | ratio |
|---|---|---|---|---|---|
| 1 stream, tokens/s incl. first token | {m(ls, 'tok_s1'):.1f} | {m(gwr, 'tok_s1'):.1f} | {m(gwr, 'tok_s1') / m(ls, 'tok_s1'):.2f}× | | |
| 1 stream, time to first token p50 | {m(ls, 'ttft1'):.0f} ms | {m(gwr, 'ttft1'):.0f} ms | {m(gwr, 'ttft1') - m(ls, 'ttft1'):+.0f} ms | | |
| 8 streams, aggregate tokens/s | {m(ls, 'tok_s8'):.1f} | {m(gwr, 'tok_s8'):.1f} | {m(gwr, 'tok_s8') / m(ls, 'tok_s8'):.2f}× | {m(api, 'tok_s8'):.1f} | {m(api, 'tok_s8') / m(ls, 'tok_s8'):.2f}× |
| 8 streams, time to first token p50 | {m(ls, 'ttft8'):.0f} ms | {m(gwr, 'ttft8'):.0f} ms | {m(gwr, 'ttft8') / m(ls, 'ttft8'):.2f}× | {m(api, 'ttft8'):.0f} ms | {m(api, 'ttft8') / m(ls, 'ttft8'):.2f}× |
| 8 streams, time to first token p95 | {pct(ls['ttft8'], 95):.0f} ms | {pct(gwr['ttft8'], 95):.0f} ms | | {pct(api['ttft8'], 95):.0f} ms | |
| repeated 500-token system prompt: 2nd / 1st first token | {m(ls, 'prefix_ratio'):.2f} | {m(gwr, 'prefix_ratio'):.2f} | | | |

Cold `gputorrent ask Hi --bootstrap ADDR --max-tokens 1`, whole process, median of 5:
**{median(gwr['cold_ask_s']):.2f} s** (target ≤ 1.0 s).

Targets (issue 14): 8-stream aggregate ≥ 1.0× and first token p50 at 8 streams ≤ 1.2× llama-server's,
through the API and the gateway; 1 stream through the gateway: first token within 30 ms, tokens/s ≥ 0.97×;
the repeated system prompt's first token ≤ 0.3× the first.
"""
    print(body)
    print(json.dumps(rows), file=sys.stderr)
    if not args.no_write:
        write_section("anchor", body)


if __name__ == "__main__":
    main()
