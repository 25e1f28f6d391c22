"""Switching a node between drivers with `imgfarm node set`, and power drift.

Driver settings are validated when the node is added or changed: a missing
MAC or BMC address is an error then, naming the key and the fix, and the
node is left as it was.
"""

from __future__ import annotations

import json

from tests.farm import Farm


def _node(farm: Farm, name: str) -> dict:
    return farm.cli_json("node", "show", name)


def test_node_set_switches_drivers_and_validates(farm: Farm) -> None:
    farm.cli("node", "add", "n1", "--disk", "/tmp/n1.img")
    out = farm.cli("node", "set", "n1", "--boot", "pxe", check=False)
    assert out.returncode == 2 and "MAC" in out.stderr.upper()
    assert _node(farm, "n1")["boot_driver"] == "sim"  # unchanged

    farm.cli("node", "set", "n1", "--boot", "pxe", "--mac", "AA-BB-CC-DD-EE-01")
    node = _node(farm, "n1")
    assert (node["boot_driver"], node["mac"]) == ("pxe", "aa:bb:cc:dd:ee:01")

    out = farm.cli("node", "set", "n1", "--power", "ipmi", check=False)
    assert out.returncode == 2 and "bmc_address" in out.stderr
    farm.cli("node", "set", "n1", "--power", "ipmi", "--set", "bmc_address=127.0.0.1",
             "--set", "bmc_password_file=/etc/imgfarm/n1.pass")
    assert _node(farm, "n1")["power_driver"] == "ipmi"

    out = farm.cli("node", "set", "n1", "--boot", "xcat", "--power", "xcat")
    assert "dropped the old drivers' settings: bmc_address, bmc_password_file" in out.stdout
    node = _node(farm, "n1")
    assert (node["boot_driver"], node["power_driver"], node["driver_info"]) == ("xcat", "xcat", {})
    out = farm.cli("node", "set", "n1", "--set", "xcat_nod=cn-1", check=False)
    assert out.returncode == 2 and "'xcat_nod' is not a setting" in out.stderr
    assert "did you mean xcat_node?" in out.stderr and _node(farm, "n1")["driver_info"] == {}
    out = farm.cli("node", "set", "n1", "--boot", "nope", check=False)
    assert out.returncode == 2 and "unknown boot driver 'nope'" in out.stderr


def test_node_import_csv_is_all_or_nothing(farm: Farm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "nodes.csv"
    good.write_text("name,mac,groups,disk\nc1,aa:bb:cc:dd:ee:01,lab;rack1,/tmp/c1.img\n"
                    "c2,aa:bb:cc:dd:ee:02,lab,/tmp/c2.img\n")
    assert farm.cli_json("node", "import", str(good)) == {"added": ["c1", "c2"]}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,mac,disk\nc3,aa:bb:cc:dd:ee:03,/tmp/c3.img\nc4,zz:zz,/tmp/c4.img\n")
    out = farm.cli("node", "import", str(bad), check=False)
    assert out.returncode == 2 and "bad.csv:3" in out.stderr and "zz:zz" in out.stderr
    rack = tmp_path / "rack.csv"  # a column no driver takes is refused, not stored
    rack.write_text("name,disk,rack\nc5,/tmp/c5.img,r7\n")
    out = farm.cli("node", "import", str(rack), check=False)
    assert out.returncode == 2 and "rack.csv:2" in out.stderr and "'rack' is not a setting" in out.stderr
    assert [n["name"] for n in farm.cli_json("node", "list")] == ["c1", "c2"]


def test_power_drift_is_recorded_as_node_events(settings_env: str) -> None:
    """A sim node powered on behind the farm's back shows up as drift."""
    from imgfarm.config.settings import get_settings
    from imgfarm.models.db import session_scope
    from imgfarm.models.tables import Node, NodeEvent
    from imgfarm.tasks.nodes import add_node
    from imgfarm.tasks.power_sync import sync_once

    with session_scope() as s:
        add_node(s, "p1", disk="/tmp/p1.img")
        add_node(s, "p2", disk="/tmp/p2.img")
        for n in s.query(Node):
            n.power_state = "off"
    sim = get_settings().sim_path / "p2"
    sim.mkdir(parents=True)
    (sim / "power.json").write_text(json.dumps({"state": "on", "pid": 0}))
    drifts = sync_once()
    assert drifts == [{"node": "p2", "kind": "changed",
                       "message": "power changed outside the farm: off -> on"}]
    with session_scope() as s:
        assert s.query(Node).filter_by(name="p2").one().power_state == "on"
        events = s.query(NodeEvent).all()
        assert [(e.kind, e.data["observed"]) for e in events] == [("power-changed", "on")]
    assert sync_once() == []  # recorded now: no drift the second time
