"""Side by side, one run: llama-server vs the gputorrent gateway (OpenAI API), the same client
workload, alternating rounds. The gateway's model name and the workload are arguments; a failed
stream is counted, not fatal; each side's own figures are reported too.

usage: side_by_side.py LLAMA_SERVER_URL GATEWAY_URL GATEWAY_MODEL [--rounds 3] [--max-tokens 160]
       [--conc 1,8] [--ls-model x]
The last line printed is a JSON summary."""
import argparse
import json
import statistics
import threading
import time

import httpx

PROMPT = "Write a long story about a lighthouse keeper."

ap = argparse.ArgumentParser()
ap.add_argument("ls")
ap.add_argument("gt")
ap.add_argument("model")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--max-tokens", type=int, default=160)
ap.add_argument("--conc", default="1,8")
ap.add_argument("--ls-model", default="x", help="the model name sent to the first URL")
a = ap.parse_args()
CONCS = [int(c) for c in a.conc.split(",")]
errors: list[str] = []


def one_stream(base, model, seed, out):
    t0 = time.perf_counter(); first = None; n = 0; usage = None
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": a.max_tokens,
            "temperature": 0.7, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line.endswith("[DONE]"):
                    continue
                d = json.loads(line[6:])
                if d.get("usage"):
                    usage = d["usage"].get("completion_tokens")
                if d.get("choices") and (d["choices"][0].get("delta") or {}).get("content"):
                    first = first or time.perf_counter(); n += 1
    except Exception as exc:
        errors.append(f"{base} seed {seed}: {type(exc).__name__}: {exc}"[:300])
        return
    end = time.perf_counter()
    out.append((t0, first or end, end, usage if usage is not None else n))


def run(base, model, conc, off):
    out = []
    ts = [threading.Thread(target=one_stream, args=(base, model, off + i, out)) for i in range(conc)]
    t = time.perf_counter(); [x.start() for x in ts]; [x.join() for x in ts]
    wall = time.perf_counter() - t
    if not out:
        return None
    return (sum(o[3] for o in out) / wall, statistics.median((o[1] - o[0]) * 1000 for o in out),
            sum(o[3] for o in out), len(out))


S = {"ls": (a.ls, a.ls_model), "gt": (a.gt, a.model)}
for k, (b, m) in S.items():  # warm-up
    run(b, m, 1, 0)
res = {k: {c: [] for c in CONCS} for k in S}
for r in range(a.rounds):
    for c in CONCS:
        for k, (b, m) in S.items():
            res[k][c].append(run(b, m, c, 100 * r + 1000))
for k in S:
    for c in CONCS:
        ok = [x for x in res[k][c] if x]
        print(k, c, "tok/s", [round(x[0], 1) for x in ok], "ttft", [round(x[1]) for x in ok],
              "toks", [x[2] for x in ok], "streams ok", [x[3] for x in ok], flush=True)
summary: dict = {"rounds": a.rounds, "max_tokens": a.max_tokens, "errors": len(errors)}
for c in CONCS:
    pairs = [(g, s) for g, s in zip(res["gt"][c], res["ls"][c]) if g and s]
    for k in S:
        ok = [x for x in res[k][c] if x]
        if ok:
            summary[f"{k}_tok_s_{c}"] = round(statistics.median(x[0] for x in ok), 1)
            summary[f"{k}_ttft_ms_{c}"] = round(statistics.median(x[1] for x in ok), 1)
            summary[f"{k}_tokens_{c}"] = [x[2] for x in ok]
    if pairs:
        ratios = [g[0] / s[0] for g, s in pairs]
        summary[f"tok_s_ratio_{c}"] = round(statistics.median(ratios), 3)
        summary[f"ttft_ratio_{c}"] = round(statistics.median(g[1] / s[1] for g, s in pairs), 3)
        summary[f"ttft_added_ms_{c}"] = round(statistics.median(g[1] - s[1] for g, s in pairs))
        print(f"gateway/llama-server at {c}: per round", [round(x, 3) for x in ratios],
              "median", summary[f"tok_s_ratio_{c}"], flush=True)
if errors:
    summary["first_errors"] = errors[:3]
print(json.dumps(summary))
