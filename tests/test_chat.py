"""``gputorrent chat`` through a real pseudo-terminal, against a real peer: three turns, a /clear,
and /bye. That the conversation travels is read from the peer's own JSON log (the prompt it
tokenized grows turn by turn and starts over after /clear), not from what a 135M model says."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _own_terminal() -> None:
    """In the child: a session of its own with the pty as its controlling terminal, so ^C on
    the pty is SIGINT to it, as in a real terminal."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A process on a pty: write lines, read until a text appears (bounded)."""

    def __init__(self, argv: list[str], env: dict) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, preexec_fn=_own_terminal)
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Everything up to and including ``text``'s next appearance."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {timeout}s; the screen so far:\n{self.seen[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    chunk = ""
                assert chunk, f"the process ended before {text!r}:\n{self.seen[-2000:]}"
                self.seen += chunk
        cut = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:cut], self.seen[cut:]
        return before

    def line(self, text: str) -> None:
        os.write(self.master, (text + "\r").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            os.close(self.master)


def _prompts(log) -> list[int]:
    """prompt_tokens of each request the peer accepted, in order."""
    out = []
    for line in log.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "accepted":
            out.append(ev["prompt_tokens"])
    return out


def test_a_three_turn_chat_keeps_the_conversation_and_clear_starts_over(swarm, tmp_path):
    peer = swarm.start("chat-peer", "--ctx", "2048", "--log-format", "json")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "gputorrent.cli", "chat", "--peer", peer.addr, "--temperature", "0",
                     "--max-tokens", "12", "--identity", str(tmp_path / "k")], env)
    try:
        term.expect(">>> ")
        term.line("What is the capital of France? Answer in one word.")
        assert "Paris" in term.expect(">>> ")
        term.line("And the capital of Italy?")
        term.expect(">>> ")
        term.line("/clear")
        term.expect("a new conversation")
        term.expect(">>> ")
        term.line("Say hello.")
        term.expect(">>> ")
        term.line("/bye")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    first, second, third = _prompts(peer.log)[-3:]
    assert second > first + 5  # turn 2 carried turn 1 and its answer
    assert third < second  # after /clear, only the new question
    assert (tmp_path / "data" / "gputorrent" / "chat_history").read_text().count("capital") == 2


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(swarm, tmp_path):
    peer = swarm.start("chat-peer-2", "--ctx", "2048")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "gputorrent.cli", "chat", "--peer", peer.addr, "--max-tokens", "1000",
                     "--identity", str(tmp_path / "k")], env)
    try:
        term.expect(">>> ")
        term.line("Write a very long story about the sea.")
        term.expect("sea.\r\n")  # the terminal's echo of the line
        term.expect(" ")  # the answer is streaming
        os.write(term.master, b"\x03")
        term.expect("(stopped)", timeout=10)
        term.expect(">>> ")
        term.line("What is the capital of France? Answer in one word.")
        term.expect(">>> ")
        os.write(term.master, b"\x04")  # Ctrl-D leaves
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
