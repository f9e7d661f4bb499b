"""A NAT lab of Linux network namespaces: a small "internet" and homes behind real NAT routers.

Home donors sit behind routers that rewrite their source addresses and drop what nobody inside
asked for. This builds that with the kernel's own NAT (nftables masquerade + a stateful forward
filter) so the swarm's reachability code meets the real thing, not a mock:

    inet  (198.51.100.0/24, a bridge; public peers: bootstrap, relays)
     ├── router-a  wan 198.51.100.2 ── lan 10.1.0.1 ── home-a 10.1.0.2   cone NAT
     ├── router-b  wan 198.51.100.3 ── lan 10.2.0.1 ── home-b 10.2.0.2   symmetric NAT
     └── router-c  wan 198.51.100.5 ── lan 10.3.0.1 ── home-c 10.3.0.2   cone NAT

"cone": masquerade keeps a connection's source port where it can, so one inside port maps to one
outside port whatever the destination (endpoint-independent mapping; filtering still follows
connections). "symmetric": ``masquerade random`` gives every connection its own random outside
port, so what a peer observed of one connection predicts nothing about the next. Every router
drops what nobody inside asked for without a word (no RST), as home routers do; TCP hole punching
relies on it: the first SYN of a simultaneous open dies at the far router instead of resetting.

Every namespace is named ``gtn<pid>-…``: a lab whose creator died is found and removed by the
next one (``sweep``), namespaces, the processes inside them and their veths alike. Addresses
exist only inside these namespaces; nothing here touches the machine's own interfaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

PREFIX = "gtn"
INET_NET = "198.51.100"  # TEST-NET-2: never routed anywhere, and here only inside the lab
RELAY_IP = f"{INET_NET}.1"
RELAY2_IP = f"{INET_NET}.4"
STEP_S = 10.0  # one ip/nft command


class LabUnavailable(RuntimeError):
    """This machine cannot build the lab (not root, no ``ip netns``, no nftables; for delay, no
    iptables); says why."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {pkg})"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _run(argv: list[str], *, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=STEP_S)
    if check and done.returncode != 0:
        raise LabUnavailable(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete(ns: str) -> None:
    _kill_inside(ns)
    _run(["ip", "netns", "del", ns], check=False)


def sweep(*, only_dead: bool = True) -> list[str]:
    """Remove labs left behind: those whose creating process is gone (or all, if not
    ``only_dead``). Deleting a namespace deletes the veths inside it."""
    removed = []
    for ns in _namespaces():
        if not ns.startswith(PREFIX):
            continue
        owner = ns[len(PREFIX):].split("-", 1)[0]
        if only_dead and owner.isdigit() and os.path.exists(f"/proc/{owner}"):
            continue
        _delete(ns)
        removed.append(ns)
    return removed


@dataclass(frozen=True)
class Link:
    """What a home's access link adds at its router, each way: ``one_way_ms`` of delay and
    ``loss`` (gputorrent/lab/delay.py, in user space: this kernel has no netem) and a rate
    (``mbit``, TBF). A home to a public host is one router (RTT 2x``one_way_ms``), a home to
    another home two (4x)."""

    name: str
    one_way_ms: float
    loss: float = 0.0
    mbit: float | None = None

    @property
    def rtt_ms(self) -> float:
        """Round trip between a home and a public host."""
        return 2 * self.one_way_ms


# The profiles of issue #35, as RTTs between a home and the public internet.
LINKS = {"lan": Link("lan", 0.25), "continent": Link("continent", 15.0, 0.001, 100.0),
         "intercontinental": Link("intercontinental", 75.0, 0.005, 50.0)}


@dataclass
class Home:
    name: str
    router: str
    ip: str
    router_wan: str
    nat: str  # "cone" or "symmetric"


@dataclass
class NatLab:
    """The topology above; ``with NatLab() as lab:`` builds it and always tears it down."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    homes: dict[str, Home] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)
    shapers: list[subprocess.Popen] = field(default_factory=list)  # delay programs (``shape``)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host`` ("inet", "home-a", "home-b", "router-a", ...)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def sh(self, host: str, *argv: str, stdin: str | None = None) -> str:
        return _run(self.exec_argv(host, list(argv)), stdin=stdin).stdout

    def __enter__(self) -> NatLab:
        reason = unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        sweep()
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _add_ns(self, host: str) -> str:
        ns = self.ns(host)
        _run(["ip", "netns", "add", ns])
        self.made.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def up(self) -> None:
        inet = self._add_ns("inet")
        _run(["ip", "-n", inet, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", inet, "addr", "add", f"{RELAY_IP}/24", "dev", "br0"])
        _run(["ip", "-n", inet, "addr", "add", f"{RELAY2_IP}/24", "dev", "br0"])
        _run(["ip", "-n", inet, "link", "set", "br0", "up"])
        self._home("a", 2, "cone")
        self._home("b", 3, "symmetric")
        self._home("c", 5, "cone")

    def _home(self, letter: str, wan_host: int, nat: str) -> None:
        inet, router, home = self.ns("inet"), self._add_ns(f"router-{letter}"), self._add_ns(f"home-{letter}")
        wan, lan_net = f"{INET_NET}.{wan_host}", f"10.{ord(letter) - ord('a') + 1}.0"
        _run(["ip", "-n", router, "link", "add", "wan0", "type", "veth", "peer", "name", f"p{letter}", "netns", inet])
        _run(["ip", "-n", inet, "link", "set", f"p{letter}", "master", "br0", "up"])
        _run(["ip", "-n", router, "addr", "add", f"{wan}/24", "dev", "wan0"])
        _run(["ip", "-n", router, "link", "set", "wan0", "up"])
        _run(["ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", home])
        _run(["ip", "-n", router, "addr", "add", f"{lan_net}.1/24", "dev", "lan0"])
        _run(["ip", "-n", router, "link", "set", "lan0", "up"])
        _run(["ip", "-n", router, "route", "add", "default", "via", RELAY_IP])
        _run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        _run(["ip", "-n", home, "addr", "add", f"{lan_net}.2/24", "dev", "eth0"])
        _run(["ip", "-n", home, "link", "set", "eth0", "up"])
        _run(["ip", "-n", home, "route", "add", "default", "via", f"{lan_net}.1"])
        masquerade = "masquerade random" if nat == "symmetric" else "masquerade"
        rules = f"""
table ip gtnat {{
  chain outbound {{ type nat hook postrouting priority srcnat; policy accept; oifname "wan0" {masquerade}; }}
  chain inbound {{
    type filter hook input priority filter; policy accept;
    iifname "wan0" ct state new drop
  }}
  chain forwarding {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan0" oifname "wan0" accept
  }}
}}
"""
        _run(["ip", "netns", "exec", router, "nft", "-f", "-"], stdin=rules)
        self.homes[letter] = Home(name=f"home-{letter}", router=f"router-{letter}", ip=f"{lan_net}.2",
                                  router_wan=wan, nat=nat)

    def shape(self, link: Link) -> None:
        """Give every home's access link ``link``'s delay, loss and rate (until ``down``)."""
        import sys

        if shutil.which("iptables-legacy") is None:
            raise LabUnavailable("`iptables-legacy` is missing (apt-get install iptables): delay uses its NFQUEUE")
        for letter, home in self.homes.items():
            router = self.ns(home.router)
            # iptables' NFQUEUE target: this kernel has it, and not nftables' own queue (NFT_QUEUE).
            _run(["ip", "netns", "exec", router, "iptables-legacy", "-t", "mangle", "-A", "FORWARD", "-j", "NFQUEUE",
                  "--queue-num", "0", "--queue-bypass"])
            proc = subprocess.Popen(self.exec_argv(home.router, [
                sys.executable, "-m", "gputorrent.lab.delay", "--ms", str(link.one_way_ms), "--loss", str(link.loss),
                "--seed", str(ord(letter))]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                raise LabUnavailable(f"the delay program did not start in {router}: {proc.communicate()[1][-500:]}")
            self.shapers.append(proc)
            if link.mbit:
                for dev in ("wan0", "lan0"):
                    _run(["ip", "netns", "exec", router, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                          f"{link.mbit}mbit", "burst", "64kb", "latency", "400ms"])

    def down(self) -> None:
        for proc in self.shapers:
            proc.kill()
            proc.wait(5)
        self.shapers.clear()
        for ns in reversed(self.made):
            _delete(ns)
        self.made.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this lab still present (none after ``down``)."""
        return [n for n in _namespaces() if n.startswith(self.tag + "-")]
