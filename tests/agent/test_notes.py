"""What the agent tells the job's events mid-job: plain text, whatever a tool printed."""

from __future__ import annotations

from imgfarm.agent.job import _noter
from imgfarm.agent.progress import Progress
from imgfarm.protocol import ProgressReport


class _Client:
    def __init__(self) -> None:
        self.sent: list[ProgressReport] = []

    def progress(self, report: ProgressReport) -> None:
        self.sent.append(report)


def test_a_note_with_a_tools_carriage_returns_is_sent_as_plain_text() -> None:
    client = _Client()
    note = _noter(client, Progress())  # type: ignore[arg-type]
    note("multicast: part0 did not arrive intact (bytes= 96 701 696\r( 22.6 Mbps)\x1b[K Dropped by server)")
    assert len(client.sent) == 1
    message = client.sent[0].message
    assert "\r" not in message and "\x1b" not in message
    assert message.startswith("multicast: part0 did not arrive intact") and "Dropped by server" in message
