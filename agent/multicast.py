"""A partition's stream by udpcast: `udp-receiver` into the hash and the restore pipe.

Partition i of the manifest (counting from 0) comes on ports PORTBASE+2i and +2i+1,
so a receiver can never take another partition's stream for its own. The receiver
listens on the interface that routes to the farm's API (where the farm's udp-sender
is). Whatever goes wrong -- the session started without this node (start timeout),
the receiver dies or is dropped, the stream's sha256 differs from the manifest -- the
caller restores that partition, and every later one, from the store by unicast,
and the job's events say why (`failed`).
"""

from __future__ import annotations

import os
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator

from imgfarm.agent.imaging import widen_pipe
from imgfarm.protocol import Multicast, Partition

CHUNK = 1 << 20
# udp-receiver's socket buffer. The kernel's default (net.core.rmem_default, 208 KiB) is
# about 8 ms of a 200 Mbit/s stream: a receiver that waits longer than that for a CPU drops
# packets, and the whole session waits for their retransmission (16 sim nodes on two cores
# lost 10-15% of all blocks that way; with 4 MiB none). The kernel grants at most
# net.core.rmem_max, which the boot image raises to this (bootimage/files/init).
RCVBUF = 4 << 20


class MulticastError(Exception):
    pass


def route_interface(url: str) -> str:
    """The interface this node reaches `url`'s host through (`ip route get`)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    out = subprocess.run(["ip", "-o", "route", "get", host], capture_output=True, text=True)
    words = out.stdout.split()
    if out.returncode == 0 and "dev" in words:
        return words[words.index("dev") + 1]
    return ""


def _reap(proc: subprocess.Popen[bytes]) -> str:
    """Wait for a udp-receiver; the tail of what it said.

    Once every byte of its stream arrived, the restore does not wait here: udp-receiver
    still sends its last acknowledgement and lingers about 0.5 s before it exits, and the
    sender counts it among the receivers of the next partition only if it does (so it is
    never killed then). Its exit status says nothing more: the stream's sha256 decides.
    """
    assert proc.stdout and proc.stderr
    err = proc.stderr.read()[-1500:].decode(errors="replace")
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return err


class ReceiverFeed:
    def __init__(self, session: Multicast, api_url: str, note: Callable[[str], None]) -> None:
        self.session = session
        self.note = note
        self.interface = route_interface(api_url)
        self.left = ""  # why this node left the session; then every partition is unicast
        self.index = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def stream(self, part: Partition) -> Iterator[bytes | memoryview] | None:
        index, self.index = self.index, self.index + 1
        if self.left:
            return None
        return self._receive(index, part)

    def _receive(self, index: int, part: Partition) -> Iterator[bytes | memoryview]:
        args = ["udp-receiver", "--nokbd", "--rcvbuf", str(RCVBUF),
                "--portbase", str(self.session.portbase + 2 * index),
                "--start-timeout", str(int(self.session.start_timeout)),
                "--receive-timeout", str(int(self.session.receive_timeout))]
        if self.interface:
            args += ["--interface", self.interface]
        self.note(f"multicast: joining session {self.session.session} for {part.file}")
        proc = self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)
        assert proc.stdout and proc.stderr
        widen_pipe(proc.stdout.fileno())
        got, complete, err = 0, False, ""
        # One buffer for the whole stream, read into and handed on as a view: the caller
        # hashes it and writes it to zstd before asking for the next. os.read() would
        # allocate (and the kernel map and fault in) a fresh 1 MiB for every read, which
        # was a third of the agent's CPU per node.
        buf = memoryview(bytearray(CHUNK))
        fd = proc.stdout.fileno()
        try:
            while got < part.stream_bytes and (n := os.readv(fd, [buf[:min(CHUNK, part.stream_bytes - got)]])):
                got += n
                yield buf[:n]
            complete = got == part.stream_bytes
        finally:
            if complete:  # the restore goes on at once; udp-receiver ends on its own
                threading.Thread(target=_reap, args=(proc,), daemon=True).start()
            else:
                if proc.poll() is None and got != part.stream_bytes:
                    proc.kill()
                err = _reap(proc)
        if complete:
            return
        if proc.returncode != 0 or got != part.stream_bytes:
            rc = proc.returncode
            tail = " ".join(err.split()[-30:])
            if got == 0:
                raise MulticastError(f"udp-receiver got nothing (exit {rc}): the session did not take "
                                     f"this node (joined late, or it never started): {tail}")
            raise MulticastError(f"udp-receiver stopped at byte {got} of {part.stream_bytes} "
                                 f"(exit {rc}): {tail}")

    def failed(self, part: Partition, why: str) -> None:
        self.left = why
        self.note(f"multicast: {part.file} did not arrive intact ({why[:300]}); restoring it and the "
                  "rest by unicast from the store")
