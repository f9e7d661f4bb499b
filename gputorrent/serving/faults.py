"""Misbehaviour a real serve process can be told to show (``serve --fault KIND``), for tests.

Hidden from ``--help``: it exists so tests exercise failover and verification against real
peer processes instead of mocks.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("corrupt-signature", "die-after-tokens", "stall-after-tokens", "wrong-tokens", "busy", "sybil",
         "dht-silent", "dht-fake-providers", "die-after-steps", "stall-after-steps", "corrupt-pieces",
         "wrong-manifest", "wrong-hidden", "pause-before-drop", "wrong-root-busy", "giant-pieces",
         "hijack-alias")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    n: int = 0

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, _, arg = text.partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of: {', '.join(KINDS)}")
        needs_n = kind.endswith(("-after-tokens", "-after-steps"))
        if needs_n and not arg.isdigit():
            raise ValueError(f"fault {kind} needs a count, e.g. {kind}=5")
        return cls(kind, int(arg) if needs_n else 0)
