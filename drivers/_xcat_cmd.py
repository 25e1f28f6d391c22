"""Run xCAT's client commands and read their per-node answers.

The contract (xCAT 2.x, `perl-xCAT/xCAT/Client.pm`): a command prints one
line per node, `NODE: DATA` on stdout; a node that failed prints
`NODE: Error: TEXT` (or `NODE: [server]: Error: TEXT`) on stderr; an error
not tied to a node prints `Error: TEXT` or `Error: [server]: TEXT`. The exit
code is the OR of the error codes, so 1 when anything failed, even if other
nodes succeeded; a noderange naming an unknown node fails the whole command
with `Error: Invalid nodes and/or groups in noderange: a,b` and changes
nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from imgfarm.config.settings import get_settings
from imgfarm.errors import DriverError

log = logging.getLogger(__name__)

# xCAT node names: letters, digits, '-', '_', '.'; never a leading '-' (an option).
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GENERAL_ERROR = re.compile(r"^Error:\s*(?:\[[^\]]*\]:\s*)?(?P<text>.*)$")
_NODE_LINE = re.compile(r"^(?P<node>[^\s:]+):\s*(?:\[[^\]]*\]:?\s*)?(?P<rest>.*)$")
_NODE_SPACED = re.compile(r"^(?P<node>\S+)\s+(?P<rest>\S.*)$")
_INVALID_NODES = re.compile(r"Invalid nodes and/or groups in noderange:\s*(?P<nodes>\S+)")


@dataclass(frozen=True)
class NodeAnswer:
    """One node's line of a command's output."""

    ok: bool
    text: str


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0])

    def general_errors(self) -> list[str]:
        errs = []
        for line in (self.stderr + "\n" + self.stdout).splitlines():
            m = _GENERAL_ERROR.match(line.strip())
            if m:
                errs.append(m.group("text"))
        return errs

    def invalid_nodes(self) -> list[str]:
        for text in self.general_errors():
            m = _INVALID_NODES.search(text)
            if m:
                return [n for n in m.group("nodes").split(",") if n]
        return []

    def tail(self, limit: int = 400) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).replace("\n", " | ")
        return text[-limit:] if text else "no output"


def executable(name: str) -> str:
    """Where xCAT's `name` command is: settings.xcat.bin_dir, else PATH."""
    bin_dir = get_settings().xcat.bin_dir
    if bin_dir:
        path = os.path.join(bin_dir, name)
        if os.access(path, os.X_OK):
            return path
        raise DriverError(
            f"xCAT command {name} not found in {bin_dir}",
            hint="set IMGFARM_XCAT__BIN_DIR to the directory holding nodeset/rpower "
            "(usually /opt/xcat/bin), or empty to search PATH",
        )
    found = shutil.which(name)
    if not found:
        raise DriverError(
            f"xCAT command {name} not found on PATH",
            hint="install the xCAT client on the worker, or set IMGFARM_XCAT__BIN_DIR "
            "(usually /opt/xcat/bin)",
        )
    return found


def run(cmd: str, args: Sequence[str], stdin: str | None = None) -> CommandResult:
    """Run one xCAT command; a timeout or a missing command is a DriverError.

    A non-zero exit is *not* raised here: with a node list, some nodes may
    have succeeded, and the caller reads each node's line.
    """
    argv = (executable(cmd), *args)
    timeout = get_settings().xcat.command_timeout
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
        )
    except subprocess.TimeoutExpired as exc:
        raise DriverError(
            f"{cmd} {_short(args)} timed out after {timeout:g}s",
            hint="is xcatd running and reachable? raise IMGFARM_XCAT__COMMAND_TIMEOUT "
            "for very large batches",
        ) from exc
    except OSError as exc:
        raise DriverError(f"{cmd} could not be started: {exc}") from exc
    result = CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)
    log.debug("%s %s -> rc=%s", cmd, _short(args), proc.returncode)
    return result


def per_node(result: CommandResult, nodes: Iterable[str]) -> dict[str, NodeAnswer | None]:
    """Each node's answer in `result` (None: the node printed nothing)."""
    wanted = set(nodes)
    out: dict[str, NodeAnswer | None] = {n: None for n in wanted}
    for line in (result.stdout + "\n" + result.stderr).splitlines():
        line = line.strip()
        if not line or _GENERAL_ERROR.match(line):
            continue
        m = _NODE_LINE.match(line)
        if not m or m.group("node") not in wanted:
            # nodestat's man page shows "node1   sshd" (no colon): accept it too.
            m = _NODE_SPACED.match(line)
            if not m or m.group("node") not in wanted:
                continue
        rest = m.group("rest").strip()
        err = re.match(r"^Error:\s*(.*)$", rest)
        node = m.group("node")
        seen = out[node]
        if err:
            out[node] = NodeAnswer(False, err.group(1))
        elif seen is None or seen.ok:  # an error line wins over data
            out[node] = NodeAnswer(True, rest)
    return out


def node_error(result: CommandResult, node: str, text: str) -> DriverError:
    """The DriverError one node's caller sees: command, exit code, xCAT's words."""
    return DriverError(
        f"{result.name} failed for {node} (exit {result.returncode}): {text}",
        hint="see the xCAT log on the management node (/var/log/xcat/cluster.log)",
    )


def _short(args: Sequence[str], limit: int = 120) -> str:
    text = " ".join(args)
    return text if len(text) <= limit else text[: limit - 3] + "..."
