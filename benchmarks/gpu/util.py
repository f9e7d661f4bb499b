"""Helpers for run.sh (standard library only).

  put RESULTS KEY JSON          set RESULTS[KEY] (dotted path) to JSON (a plain string if not JSON)
  putfile RESULTS KEY FILE      the last line of FILE that parses as JSON (or the whole file)
  jget FILE EXPR                print EXPR evaluated with d = the JSON in FILE
  wait_file FILE TIMEOUT [PID]  wait until FILE holds JSON; prints seconds waited; exit 1 on timeout,
                                exit 2 (at once) when process PID has ended before that
  http_wait URL TIMEOUT [TEXT] [PID]
                                wait until URL answers 200 (and its body holds TEXT); exits as wait_file
  died RESULTS KEY RC LOG [N]   set RESULTS[KEY] to {"exit_rc": RC, "log_tail": the last N (40) lines of LOG}
  tree_hash ROOT                a short sha256 of ROOT's package sources (gputorrent/, pyproject.toml;
                                no __pycache__): prepare.sh records it, run.sh compares
  free_port                     a free TCP port on 127.0.0.1
  gpu_mem [PID...]              JSON: nvidia-smi used memory in total and per compute process
  peers FILE                    JSON: the device and models of each peer in a 'peers --json' file
  cuda_shim NVCC SHIMDIR        cmake -D arguments that point CMake at cuBLAS / libcuda wherever
                                they are (toolkit, pip 'nvidia' packages, driver dirs); 1 per line;
                                a last line 'LD=dir:dir' for LD_LIBRARY_PATH
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _set(data: dict, key: str, value) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value


def _parse(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def put(results: str, key: str, value: str) -> None:
    data = _load(results)
    _set(data, key, _parse(value))
    _save(results, data)


def last_json(path: str):
    try:
        text = open(path, errors="replace").read()
    except OSError as exc:
        return {"error": f"no file: {exc}"}
    try:
        return json.loads(text)
    except ValueError:
        pass
    lines = text.strip().splitlines()
    for line in reversed(lines):
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {"error": "no JSON line", "tail": lines[-6:]}


def putfile(results: str, key: str, path: str) -> None:
    data = _load(results)
    _set(data, key, last_json(path))
    _save(results, data)


def jget(path: str, expr: str) -> None:
    print(eval(expr, {"d": last_json(path)}))


def alive(pid: int) -> bool:
    """Whether process PID still runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait(check, timeout: str, pid: str) -> int:
    """0: check() held (prints the seconds waited); 1: timed out; 2: process PID ended first."""
    t0 = time.monotonic()
    p = int(pid) if pid else 0
    while True:
        if check():
            print(round(time.monotonic() - t0, 2))
            return 0
        if p and not alive(p):
            return 0 if check() else 2  # it may have got ready just before it ended
        if time.monotonic() - t0 >= float(timeout):
            return 1
        time.sleep(0.1)


def wait_file(path: str, timeout: str, pid: str = "") -> int:
    def check() -> bool:
        try:
            with open(path) as f:
                json.load(f)
            return True
        except (OSError, ValueError):
            return False

    return _wait(check, timeout, pid)


def http_wait(url: str, timeout: str, text: str = "", pid: str = "") -> int:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read().decode(errors="replace")
                return r.status == 200 and (not text or text in body)
        except Exception:
            time.sleep(0.15)
            return False

    return _wait(check, timeout, pid)


def died(results: str, key: str, rc: str, log: str, n: str = "40") -> None:
    try:
        lines = open(log, errors="replace").read().splitlines()[-int(n):]
    except OSError as exc:
        lines = [f"no log: {exc}"]
    value: dict = {"exit_rc": _parse(rc), "log_tail": lines}
    if isinstance(value["exit_rc"], int) and value["exit_rc"] > 128:
        value["signal"] = value["exit_rc"] - 128  # 139: 11, a segmentation fault
    data = _load(results)
    _set(data, key, value)
    _save(results, data)


def tree_hash(root: str) -> None:
    print(tree_digest(root))


def tree_digest(root: str) -> str:
    import hashlib

    files = []
    for base, dirs, names in os.walk(os.path.join(root, "gputorrent")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += [os.path.join(base, n) for n in names if not n.endswith((".pyc", ".pyo"))]
    if os.path.isfile(os.path.join(root, "pyproject.toml")):
        files.append(os.path.join(root, "pyproject.toml"))
    h = hashlib.sha256()
    for f in sorted(os.path.relpath(x, root) for x in files):
        with open(os.path.join(root, f), "rb") as fh:
            h.update(f.encode() + b"\0" + hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16] if files else "none"


def free_port() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def gpu_mem(*pids: str) -> None:
    out: dict = {}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
        used, total = (x.strip() for x in q.stdout.strip().splitlines()[0].split(","))
        out["gpu_used_mib"], out["gpu_total_mib"] = int(float(used)), int(float(total))
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
        apps = {}
        for line in q.stdout.strip().splitlines():
            p, m = (x.strip() for x in line.split(","))
            apps[p] = int(float(m)) if m.replace(".", "").isdigit() else m
        out["apps_mib"] = apps
        if pids:
            out["pids_mib"] = {p: apps.get(p) for p in pids}
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))


def peers(path: str) -> None:
    d = last_json(path)
    rows = []
    if isinstance(d, list):
        for p in d:
            dev = p.get("device") or {}
            rows.append({"peer_id": str(p.get("peer_id", ""))[:20], "device": dev,
                         "models": [{k: m.get(k) for k in ("alias", "first_block", "end_block", "quantization")
                                     if k in m} for m in p.get("models", [])],
                         "tokens_per_s": p.get("tokens_per_s"), "rtt_ms": p.get("rtt_ms")})
        print(json.dumps(rows))
    else:
        print(json.dumps({"error": "not a list", "got": d}))


def cuda_shim(nvcc: str, shim: str) -> None:
    nvcc = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(nvcc))
    try:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        major = v.split("release ")[1].split(".")[0]
    except Exception:
        major = "13"
    sites = []
    for p in sys.path + [os.path.join(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                                      "site-packages")]:
        if p and os.path.isdir(os.path.join(p, "nvidia")):
            sites.append(os.path.join(p, "nvidia"))
    tk_libs = [os.path.join(home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    tk_libs += sorted(glob.glob("/usr/local/cuda*/lib64")) + sorted(glob.glob("/usr/local/cuda*/targets/x86_64-linux/lib"))
    pip_libs = []
    for s in sites:
        pip_libs += [os.path.join(s, f"cu{major}", "lib"), os.path.join(s, "cublas", "lib")]
    sys_libs = ["/usr/lib/x86_64-linux-gnu", "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib64"]
    lib_dir = os.path.join(shim, "lib")
    os.makedirs(lib_dir, exist_ok=True)
    args, ld = [], []

    def find(name: str, dirs: list[str]) -> str | None:
        for d in dirs:
            for cand in (f"lib{name}.so", f"lib{name}.so.{major}"):
                p = os.path.join(d, cand)
                if os.path.exists(p):
                    return p
            hits = sorted(glob.glob(os.path.join(d, f"lib{name}.so.*")))
            if hits:
                return hits[0]
        return None

    for name in ("cublas", "cublasLt"):
        p = find(name, tk_libs + pip_libs + sys_libs)
        if p is None:
            print(f"# lib{name} not found", file=sys.stderr)
            continue
        real = os.path.realpath(p)
        for link in (f"lib{name}.so", f"lib{name}.so.{major}"):
            dst = os.path.join(lib_dir, link)
            if os.path.lexists(dst):
                os.remove(dst)
            os.symlink(real, dst)
        args.append(f"-DCUDA_{name}_LIBRARY={os.path.join(lib_dir, f'lib{name}.so')}")
        ld.append(os.path.dirname(real))
    drv = None
    for d in [os.path.join(x, "stubs") for x in tk_libs] + sys_libs:
        for cand in ("libcuda.so", "libcuda.so.1"):
            if os.path.exists(os.path.join(d, cand)):
                drv = os.path.join(d, cand)
                break
        if drv:
            break
    if drv is None:
        try:
            out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20).stdout
            for line in out.splitlines():
                if "libcuda.so" in line and "=>" in line:
                    drv = line.split("=>")[1].strip()
                    break
        except Exception:
            pass
    if drv:
        dst = os.path.join(lib_dir, "libcuda.so")
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.realpath(drv), dst)
        args.append(f"-DCUDA_cuda_driver_LIBRARY={dst}")
    else:
        args.append("-DGGML_CUDA_NO_VMM=ON")  # no libcuda to link: ggml-cuda then needs none
    inc = None
    for d in [os.path.join(home, "include"), os.path.join(home, "targets/x86_64-linux/include")]:
        if os.path.exists(os.path.join(d, "cublas_v2.h")):
            inc = "toolkit"
            break
    if inc is None:
        for s in sites:
            for d in (os.path.join(s, f"cu{major}", "include"), os.path.join(s, "cublas", "include")):
                if os.path.exists(os.path.join(d, "cublas_v2.h")):
                    inc = d
                    break
            if inc:
                break
        if inc:
            args.append(f"-DCMAKE_CUDA_FLAGS=-I{inc}")
            args.append(f"-DCMAKE_CXX_FLAGS=-I{inc}")
        else:
            print("# cublas_v2.h not found", file=sys.stderr)
    for a in args:
        print(a)
    print("LD=" + ":".join(dict.fromkeys(ld)))


def main() -> int:
    cmd, *rest = sys.argv[1:]
    fn = {"put": put, "putfile": putfile, "jget": jget, "wait_file": wait_file, "http_wait": http_wait,
          "free_port": free_port, "gpu_mem": gpu_mem, "peers": peers, "cuda_shim": cuda_shim,
          "died": died, "tree_hash": tree_hash}[cmd]
    rc = fn(*rest)
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
