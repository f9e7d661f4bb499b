"""Prepares this kit for a call of the GPU machine; run by prepare.sh, on your own machine, with any
Python 3.8+ that has pip (Python 3.12 is not needed: wheels are chosen for it by pip's own flags).

1. Builds the project's wheel from the working tree (the files git would send: tracked, and untracked
   but not ignored) into whl/, replacing the one there.
2. Walks that wheel's runtime requirements (pyproject.toml's dependencies) and theirs in turn, as they
   apply to CPython 3.12 on Linux x86-64, and for each package that whl/ lacks, or holds in a version
   the requirements exclude, downloads one wheel with
     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                  --platform manylinux_2_28_x86_64 (and the older manylinux tags) -d whl/ 'NAME<spec>'
   Left out: packages the GPU machine's image already holds (device-packages.txt), unless whl/ has
   them, and llama-cpp-python, which is the kit's own (llama.cpp.tar.gz, built there, and pylib/).
3. Checks whl/ (one version per package; every wheel installable on CPython 3.12, Linux x86-64),
   writes prepared.json (what was built, from which sources) and prints sizes.

usage: python prepare.py [--offline] [--prune]
  --offline  build the project's wheel only; download nothing (missing packages are listed)
  --prune    delete wheels that no requirement reaches any more
"""
from __future__ import annotations

import argparse
import datetime
import email.parser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

KIT = Path(__file__).resolve().parent
ROOT = KIT.parent
WHL = KIT / "whl"
sys.path.insert(0, str(KIT))
import util  # noqa: E402  (this kit's helpers: tree_digest, which run.sh compares on the GPU machine)

# The kit's llama.cpp sources (llama.cpp.tar.gz) and pylib/llama_cpp come from llama-cpp-python's
# sdist of this version; its own requirements from that sdist's metadata (remake_llama.py writes both)
_LLAMA = json.loads((KIT / "llama-cpp-python.json").read_text())
LLAMA_CPP_PYTHON = _LLAMA["version"]
LLAMA_CPP_PYTHON_REQUIRES = _LLAMA["requires"]

# CPython 3.12 on Linux x86-64 (the GPU machine's python3), for requirement markers
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "os_name": "posix",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "platform_release": "", "platform_version": ""}
# manylinux tags tried first (the GPU machine's glibc is newer; these suit most packages) ...
BASE_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
                  "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux_2_12_x86_64",
                  "manylinux1_x86_64", "manylinux_2_5_x86_64"]
# ... and then, for a package that has none of those (pip matches each tag exactly)
MORE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 28, -1)]


def supported_tags() -> set:
    plats = MORE_PLATFORMS + BASE_PLATFORMS
    tags = set(cpython_tags((3, 12), abis=["cp312"], platforms=plats))
    tags |= set(compatible_tags((3, 12), "cp312", platforms=plats))
    return tags


def say(msg: str) -> None:
    print(msg, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def wheel_info(path: Path) -> tuple[str, str]:
    name, version, _build, _tags = parse_wheel_filename(path.name)
    return canonicalize_name(name), str(version)


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if not meta:
            return []
        msg = email.parser.Parser().parsestr(z.read(meta[0]).decode("utf-8", "replace"))
    return msg.get_all("Requires-Dist") or []


def requirements(lines: list[str], extras: set[str], owner: str, notes: list[str]) -> list[Requirement]:
    """The requirements among LINES (Requires-Dist values) that apply on the GPU machine, with EXTRAS."""
    out = []
    for line in lines:
        try:
            req = Requirement(line)
        except Exception as exc:
            notes.append(f"{owner}: unreadable requirement {line!r}: {exc}")
            continue
        if req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in ({""} | extras)):
            out.append(req)
    return out


def working_tree_files() -> list[str]:
    p = run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"])
    if p.returncode != 0:
        sys.exit(f"prepare: {ROOT} is not a git checkout ({p.stderr.strip()}); the kit belongs in the checkout's root")
    return [f for f in p.stdout.split("\0") if f and os.path.isfile(ROOT / f) and not f.startswith(KIT.name + "/")]


def build_project_wheel(tmp: Path) -> tuple[Path, str]:
    """The working tree's files into tmp/src, a wheel of them into whl/ (the old one removed)."""
    src, out = tmp / "src", tmp / "wheel"
    for f in working_tree_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f, follow_symlinks=True)
    tree = util.tree_digest(str(src))
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out)]
    tries = [base + [str(src)]]
    try:
        import setuptools  # noqa: F401  (then no build environment needs to be downloaded)

        tries.insert(0, base + ["--no-build-isolation", str(src)])
    except ImportError:
        pass
    err = ""
    for cmd in tries:
        p = run(cmd)
        built = sorted(out.glob("*.whl"))
        if p.returncode == 0 and built:
            break
        err = (p.stdout + p.stderr)[-3000:]
    else:
        sys.exit(f"prepare: building the project's wheel failed:\n{err}")
    new = built[0]
    name, version = wheel_info(new)
    for old in WHL.glob("*.whl"):
        if wheel_info(old)[0] == name:
            old.unlink()
            if old.name != new.name:
                say(f"  removed {old.name}")
    shutil.copy2(new, WHL / new.name)
    say(f"built {new.name} ({new.stat().st_size // 1024} KiB) from the working tree (sources {tree})")
    return WHL / new.name, tree


def download(name: str, spec: SpecifierSet, tmp: Path) -> tuple[Path | None, str]:
    target = f"{name}{spec}"
    err = ""
    for i, plats in enumerate((BASE_PLATFORMS, MORE_PLATFORMS)):
        d = Path(tempfile.mkdtemp(dir=tmp))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "--python-version", "3.12", "--implementation", "cp", "-d", str(d), target]
        for p in plats:
            cmd[-1:-1] = ["--platform", p]
        p = run(cmd)
        got = sorted(d.glob("*.whl"))
        if p.returncode == 0 and got:
            note = "" if i == 0 else " (a newer manylinux tag: check the GPU machine's glibc if it fails to import)"
            return got[0], note
        lines = (p.stdout + p.stderr).strip().splitlines()
        err = lines[-1] if lines else f"pip exited with {p.returncode}"
    return None, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offline", action="store_true", help="build the project's wheel only; download nothing")
    ap.add_argument("--prune", action="store_true", help="delete wheels that no requirement reaches any more")
    a = ap.parse_args()
    if not (ROOT / "pyproject.toml").is_file():
        sys.exit(f"prepare: no pyproject.toml in {ROOT}: put this kit into the project's checkout as .gpu-kit/")
    ign = run(["git", "-C", str(ROOT), "check-ignore", "-q", KIT.name])
    if ign.returncode != 0:
        say(f"WARNING: {KIT.name}/ is not ignored by git: add '/{KIT.name}/' to .git/info/exclude (the device"
            " tool carries ignored paths, and the kit must not be committed)")
    device = {canonicalize_name(x.strip()) for x in (KIT / "device-packages.txt").read_text().split() if x.strip()}
    WHL.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-kit-prep."))
    try:
        own_wheel, tree = build_project_wheel(tmp)
        own = wheel_info(own_wheel)[0]

        def index() -> dict[str, list[Path]]:
            have: dict[str, list[Path]] = {}
            for w in sorted(WHL.glob("*.whl")):
                have.setdefault(wheel_info(w)[0], []).append(w)
            return have

        have = index()
        specs: dict[str, SpecifierSet] = {}      # every specifier met so far, per package
        edges: list[tuple[str, str, str]] = []   # (package, specifier, required by)
        chosen: dict[str, Path] = {}
        expanded: dict[str, tuple[Path | None, set[str]]] = {}  # the wheel whose requirements were queued, extras
        to_device: dict[str, list[str]] = {}
        downloaded, failed, missing_offline, notes, mismatch = [], [], [], [], []
        todo = deque((r, own) for r in requirements(wheel_requires(own_wheel), set(), own, notes))
        while todo:
            req, parent = todo.popleft()
            n = canonicalize_name(req.name)
            if n == own:
                continue
            edges.append((n, str(req.specifier), parent))
            specs[n] = specs.get(n, SpecifierSet()) & req.specifier
            if n == "llama-cpp-python":  # the kit's own: built on the GPU machine from llama.cpp.tar.gz
                if not req.specifier.contains(LLAMA_CPP_PYTHON, prereleases=True):
                    mismatch.append(f"the project requires llama-cpp-python{req.specifier}, this kit carries "
                                    f"{LLAMA_CPP_PYTHON}'s llama.cpp and pylib/: remake them (remake_llama.py)")
                if n not in expanded:
                    expanded[n] = (None, set())
                    todo.extend((r, n) for r in requirements(LLAMA_CPP_PYTHON_REQUIRES, set(), n, notes))
                continue
            ok = [w for w in have.get(n, []) if specs[n].contains(wheel_info(w)[1], prereleases=True)]
            if ok:
                chosen[n] = ok[-1]
            elif n in device and not have.get(n):
                to_device.setdefault(n, []).append(f"{req.specifier or '(any)'} for {parent}")
                continue
            elif a.offline:
                if not any(m.startswith(f"{n} ") for m in missing_offline):
                    missing_offline.append(f"{n} {specs[n]} (for {parent})")
                continue
            else:
                got, note = download(n, specs[n], tmp)
                if got is None:
                    failed.append(f"{n}{specs[n]} (for {parent}): {note}")
                    continue
                for old in have.get(n, []):
                    old.unlink()
                    say(f"  removed {old.name} ({n}{specs[n]} excludes it)")
                shutil.move(str(got), WHL / got.name)
                have = index()
                chosen[n] = WHL / got.name
                downloaded.append(got.name)
                say(f"  downloaded {got.name}{note}")
            extras = {canonicalize_name(e) for e in req.extras}
            prev = expanded.get(n)
            if prev and prev[0] == chosen[n] and extras <= prev[1]:
                continue  # its requirements are queued already
            extras |= prev[1] if prev else set()
            expanded[n] = (chosen[n], extras)
            todo.extend((r, n) for r in requirements(wheel_requires(chosen[n]), extras, n, notes))

        # every requirement met by the wheel finally chosen?
        conflicts = sorted({f"{n}: {chosen[n].name} does not meet {s} (required by {p})" for n, s, p in edges
                            if n in chosen and s and not SpecifierSet(s).contains(wheel_info(chosen[n])[1], prereleases=True)})
        have = index()
        multi = {n: [w.name for w in ws] for n, ws in have.items() if len(ws) > 1}
        tags = supported_tags()
        foreign = [w.name for ws in have.values() for w in ws if not (parse_wheel_filename(w.name)[3] & tags)]
        unused = sorted(w.name for n, ws in have.items() if n not in chosen and n != own for w in ws)
        if a.prune:
            for name in unused:
                (WHL / name).unlink()
                say(f"  pruned {name}")
            have = index()
            unused = []

        head = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
        wheels = sorted(w.name for ws in have.values() for w in ws)
        size = sum((WHL / w).stat().st_size for w in wheels)
        info = {"prepared_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "project_wheel": own_wheel.name, "tree_sha256": tree, "git_head": head, "git_dirty": dirty,
                "python": sys.version.split()[0], "wheels": len(wheels), "wheels_bytes": size,
                "downloaded": downloaded, "left_to_device": {k: v for k, v in sorted(to_device.items())},
                "unused": unused, "problems": {"download_failed": failed, "not_downloaded_offline": missing_offline,
                                               "several_versions": multi, "not_for_cp312_linux": foreign,
                                               "conflicts": conflicts, "llama_cpp_python": mismatch,
                                               "notes": notes}}
        (KIT / "prepared.json").write_text(json.dumps(info, indent=1) + "\n")

        kit_bytes = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
        tree_bytes = sum((ROOT / f).stat().st_size for f in working_tree_files())
        say(f"whl/: {len(wheels)} wheels, {size / 2**20:.1f} MiB; {len(chosen)} packages needed, "
            f"{len(to_device)} left to the GPU machine's image ({', '.join(sorted(to_device))})")
        say(f"travels: kit {kit_bytes / 2**20:.1f} MiB + checkout {tree_bytes / 2**20:.1f} MiB = "
            f"{(kit_bytes + tree_bytes) / 2**20:.1f} MiB (the limit is 64 MiB)")
        if unused:
            say(f"not needed by the current requirements (--prune deletes them): {', '.join(unused)}")
        bad = False
        for label, items in (("download failed", failed), ("not downloaded (--offline)", missing_offline),
                             ("several versions of one package (the install on the GPU machine would stop)",
                              [f"{k}: {v}" for k, v in multi.items()]),
                             ("not installable on CPython 3.12, Linux x86-64", foreign),
                             ("requirement not met", conflicts), ("llama-cpp-python", mismatch), ("note", notes)):
            for item in items:
                say(f"PROBLEM: {label}: {item}" if label != "note" else f"NOTE: {item}")
                bad = bad or label != "note"
        if failed:
            say("  a package with no wheel for CPython 3.12 (only an sdist): build one where Python 3.12 is "
                "(python3.12 -m pip wheel --no-deps NAME==VERSION, then auditwheel repair) and put it into whl/")
        if kit_bytes + tree_bytes > 60 * 2**20:
            say("PROBLEM: what travels is near or over the 64 MiB limit")
            bad = True
        say("prepared.json written" + ("; fix the problems above before a call" if bad else "; ready: "
            "on the GPU machine, from the checkout's root with .gpu-kit present: bash .gpu-kit/run.sh (600 s limit)"))
        return 1 if bad else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
