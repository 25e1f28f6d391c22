"""Stand-ins for xCAT's client commands (nodeset, rpower, nodestat, tabdump, chdef).

xCAT cannot run here, so the drivers are tested against its command
contract: argument forms, per-node output lines (`NODE: DATA` on stdout,
`NODE: Error: TEXT` on stderr, `Error: [server]: TEXT` for whole-command
errors), exit codes (the OR of error codes: 1 if anything failed), and the
noderange rule (an unknown node name fails the whole command with
"Invalid nodes and/or groups in noderange: ..." and changes nothing). See
xcat-core perl-xCAT/xCAT/Client.pm, xCAT-server/sbin/xcatd and the man pages
nodeset(8), rpower(1), nodestat(1), tabdump(8), chdef(1), xcatstanzafile(5).

State lives in $XCATFAKE_STATE:
  nodes.json   {node: {os, arch, profile, currstate, power, addkcmdline,
                       boot_kcmdline, status, fail: {cmd: message}}}
  config.json  {osimages: {name: {provmethod, os, arch, profile}},
                site: {key: value}, sleep: {cmd: s}, exit: {cmd: {rc, stderr}}}
  calls.log    one JSON line per invocation: cmd, argv, stdin
Every invocation holds an flock on state/lock, like xcatd's table locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time

SERVER = "xcatmn"


def _load(state: str, name: str, default):
    try:
        with open(os.path.join(state, name)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default


def _save(state: str, name: str, data) -> None:
    tmp = os.path.join(state, name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(state, name))


def _err(text: str) -> None:
    print(f"Error: [{SERVER}]: {text}", file=sys.stderr)


def _noderange(arg: str, nodes: dict) -> tuple[list[str], int]:
    names = [n for n in arg.split(",") if n]
    missing = [n for n in names if n not in nodes]
    if missing:
        _err("Invalid nodes and/or groups in noderange: " + ",".join(missing))
        return [], 1
    return names, 0


def _stanza(text: str) -> dict[str, dict[str, str]]:
    objs: dict[str, dict[str, str]] = {}
    cur = None
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        if line.rstrip().endswith(":") and "=" not in line:
            cur = line.strip()[:-1].strip()
            objs[cur] = {}
            continue
        m = re.match(r"^\s*(.*?)\s*=\s*(.*)\s*$", line)
        if m is None or cur is None:
            raise ValueError(f"bad stanza line {line!r}")
        val = m.group(2).strip()
        val = re.sub(r'^\s*"\s*', "", val)
        val = re.sub(r'\s*"\s*$', "", val)
        objs[cur][m.group(1)] = val
    return objs


def nodeset(args, nodes, cfg) -> int:
    if len(args) < 2:
        _err("Usage: nodeset <noderange> [boot|stat|osimage=<imagename>|...]")
        return 1
    names, rc = _noderange(args[0], nodes)
    if rc:
        return rc
    action = args[1]
    if action == "stat":
        for n in names:
            print(f"{n}: {nodes[n].get('currstate', 'boot')}")
        return 0
    image = None
    if action.startswith("osimage="):
        image = action.split("=", 1)[1]
        if image not in cfg.get("osimages", {}):
            _err(f"Cannot find the OS image {image} on the osimage table.")
            return 1
    elif action not in ("boot", "offline", "shell"):
        _err(f"Unknown state {action} requested")
        return 1
    for n in names:
        node = nodes[n]
        fail = node.get("fail", {}).get("nodeset")
        if fail:
            print(f"{n}: Error: {fail}", file=sys.stderr)
            rc = 1
            continue
        if image:
            img = cfg["osimages"][image]
            state = f"{img.get('provmethod', 'netboot')} {img['os']}-{img['arch']}-{img['profile']}"
            node["boot_kcmdline"] = node.get("addkcmdline", "")
        else:
            state = action
            node["boot_kcmdline"] = ""
        if not node.get("sticky"):  # sticky: something else owns the boot state
            node["currstate"] = state
        print(f"{n}: {node['currstate']}")
    return rc


def rpower(args, nodes, cfg) -> int:
    if len(args) < 2:
        _err("Usage: rpower <noderange> [on|off|reset|boot|stat|state]")
        return 1
    names, rc = _noderange(args[0], nodes)
    if rc:
        return rc
    action = args[1]
    if action not in ("on", "off", "reset", "boot", "stat", "state", "status"):
        _err(f"Unsupported command: rpower {action}")
        return 1
    for n in names:
        node = nodes[n]
        fail = node.get("fail", {}).get("rpower")
        if fail:
            print(f"{n}: Error: {fail}", file=sys.stderr)
            rc = 1
            continue
        power = node.get("power", "off")
        if action in ("on", "off"):
            node["power"] = out = action
        elif action == "reset":
            out = "reset"
        elif action == "boot":
            out = "reset" if power == "on" else "on"
            node["power"] = "on"
            node["boots"] = node.get("boots", 0) + 1
        else:
            out = power
        print(f"{n}: {out}")
    return rc


def nodestat(args, nodes, cfg) -> int:
    names, rc = _noderange(args[0], nodes) if args else ([], 1)
    for n in names:
        print(f"{n}: {nodes[n].get('status', 'noping')}")
    return rc


def tabdump(args, nodes, cfg) -> int:
    if args != ["site"]:
        _err("this stand-in only dumps the site table")
        return 1
    print("#key,value,comments,disable")
    for key, value in cfg.get("site", {}).items():
        print(f'"{key}","{value}",,')
    return 0


def chdef(args, nodes, cfg, stdin: str) -> int:
    if args == ["-z"]:
        try:
            objs = _stanza(stdin)
        except ValueError as exc:
            _err(str(exc))
            return 1
    elif len(args) >= 4 and args[0] == "-t" and args[1] == "node" and args[2] == "-o":
        objs = {n: dict(a.split("=", 1) for a in args[4:]) for n in args[3].split(",")}
    else:
        _err("Usage: chdef -z < stanza | chdef -t node -o NODES attr=val ...")
        return 1
    for name, attrs in objs.items():
        attrs.pop("objtype", None)
        nodes.setdefault(name, {}).update(attrs)  # chdef creates what it does not find
    print(f"{len(objs)} object definitions have been created or modified.")
    return 0


def main(cmd: str) -> None:
    state = os.environ["XCATFAKE_STATE"]
    args = sys.argv[1:]
    stdin = sys.stdin.read() if cmd == "chdef" and "-z" in args else ""
    with open(os.path.join(state, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.path.join(state, "calls.log"), "a") as log:
            log.write(json.dumps({"cmd": cmd, "argv": args, "stdin": stdin,
                                  "t": time.time()}) + "\n")
        cfg = _load(state, "config.json", {})
        delay = cfg.get("sleep", {}).get(cmd)
        if delay:
            time.sleep(delay)
        forced = cfg.get("exit", {}).get(cmd)
        if forced:
            sys.stderr.write(forced.get("stderr", ""))
            sys.exit(forced.get("rc", 1))
        nodes = _load(state, "nodes.json", {})
        if cmd == "chdef":
            rc = chdef(args, nodes, cfg, stdin)
        else:
            rc = {"nodeset": nodeset, "rpower": rpower, "nodestat": nodestat,
                  "tabdump": tabdump}[cmd](args, nodes, cfg)
        _save(state, "nodes.json", nodes)
    sys.exit(rc)
