"""The drivers' property tables: what validation, help, the CLI and the docs all read.

One table per driver (`properties`, Ironic's get_properties()); these tests
hold the table to being the single source: the committed docs are what it
generates, `node add --help` and `driver show` print it, unknown keys and bad
values are refused by it, and drivers are found through entry points as a
third-party package's would be.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgfarm.drivers import docs, registry
from imgfarm.drivers.base import BootInterface, NodeInfo, PowerInterface
from imgfarm.drivers.properties import MAX_VALUE_CHARS, built_in_settings, secret_keys
from imgfarm.errors import DriverSettingsError

ROOT = Path(__file__).resolve().parents[2]


def ipmi_node(**info: object) -> NodeInfo:
    base = {"bmc_address": "10.0.0.9", "bmc_password_file": "/etc/imgfarm/bmc.pw"}
    return NodeInfo(name="n1", disk="/tmp/n1.img", boot_driver="sim", power_driver="ipmi",
                    driver_info={**base, **info})


# --- the tables themselves -----------------------------------------------------------

def test_every_built_in_driver_declares_a_well_formed_table(settings_env):
    drivers = registry.all_drivers(built_in_only=True)
    assert sorted((d.kind, d.name) for d in drivers) == [
        ("boot", "pxe"), ("boot", "sim"), ("boot", "xcat"),
        ("power", "ipmi"), ("power", "sim"), ("power", "xcat")]
    for drv in drivers:
        names = [p.name for p in drv.properties]
        assert len(names) == len(set(names)), f"{drv.name}: a key declared twice"
        assert drv.get_properties() == {p.name: p for p in drv.properties}
        assert docs.summary(drv), f"{drv.name}: no one-line summary (class docstring)"
        for prop in drv.properties:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", prop.name), prop.name
            assert prop.description and "\n" not in prop.description, prop.name
            assert all(c == c.lower() for c in prop.choices), prop.name
            if prop.required:
                assert prop.example, f"{prop.name}: a required key needs an example for its hint"
            prop.fallback(built_in_settings())  # a setting path that does not resolve raises
            if prop.example:
                assert prop.problem(prop.example) is None, f"{prop.name}: example is refused"
    assert secret_keys(drivers) == {"bmc_password"}


def test_committed_docs_are_what_the_tables_generate(settings_env):
    text = (ROOT / "docs" / "drivers.md").read_text()
    assert docs.update_markdown(text) == text, "docs/drivers.md is stale: run `make docs`"
    for drv in registry.all_drivers(built_in_only=True):
        assert f"<!-- properties: {drv.kind} {drv.name} -->" in text or (
            drv.name == "xcat" and "<!-- properties: boot xcat -->" in text), drv.name


def test_docs_regeneration_rewrites_a_stale_table(tmp_path, settings_env):
    page = tmp_path / "drivers.md"
    page.write_text("x\n<!-- properties: power ipmi -->\n| old |\n<!-- /properties -->\ny\n")
    assert docs.main(["--check", str(page)]) == 1
    assert docs.main([str(page)]) == 0
    text = page.read_text()
    assert "| `bmc_address` | required |" in text and "| old |" not in text
    assert "`623` (`IMGFARM_IPMI__PORT`)" in text  # the shipped default, not this machine's
    assert docs.main(["--check", str(page)]) == 0


# --- entry points ----------------------------------------------------------------------

def test_built_in_drivers_are_the_entry_points_in_pyproject(settings_env):
    """The installed metadata is pyproject's (a stale install would fail here)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for kind, base in (("boot", BootInterface), ("power", PowerInterface)):
        group = f"imgfarm.{kind}_drivers"
        installed = {ep.name: ep.value for ep in entry_points(group=group)
                     if ep.dist and ep.dist.name == "imgfarm"}
        assert installed == declared[group]
        for name in installed:
            drv = registry.driver(kind, name)
            assert isinstance(drv, base) and drv.name == name and drv.kind == kind


def test_a_third_party_driver_is_found_like_a_built_in(tmp_path):
    """A package on the path with an entry point: registry, validation and CLI see it."""
    (tmp_path / "acme_power.py").write_text(
        "from imgfarm.drivers.base import PowerInterface, PowerState, Property\n"
        "class AcmePower(PowerInterface):\n"
        '    """Acme PDUs: one outlet per node."""\n'
        '    name = "acme"\n'
        '    properties = (Property("pdu_outlet", "the outlet", required=True, example="7"),)\n'
        "    def get_power_state(self, node): return PowerState.ON\n"
        "    def set_power_state(self, node, state): pass\n")
    dist = tmp_path / "acme_power-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-power\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[imgfarm.power_drivers]\nacme = acme_power:AcmePower\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "IMGFARM_DATA_DIR": str(tmp_path / "d")}
    env.pop("IMGFARM_CONFIG", None)
    script = (
        "from imgfarm.drivers import registry\n"
        "from imgfarm.drivers.base import NodeInfo\n"
        "from imgfarm.errors import DriverSettingsError\n"
        "n = NodeInfo(name='a1', disk='/tmp/a1.img', power_driver='acme')\n"
        "try:\n    registry.validate_node(n)\nexcept DriverSettingsError as e:\n    print(e)\n"
        "registry.validate_node(NodeInfo(name='a1', disk='/tmp/a1.img', power_driver='acme',"
        " driver_info={'pdu_outlet': '7'}))\n"
        "print([d.name for d in registry.all_drivers(built_in_only=True)].count('acme'))\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    assert "the acme power driver needs pdu_outlet" in out[0] and "--set pdu_outlet=7" in out[0]
    assert out[1] == "0"  # not a built-in: the committed docs do not depend on it
    shown = subprocess.run([sys.executable, "-m", "imgfarm.cli.main", "driver", "show", "acme",
                            "--json"], env=env, capture_output=True, text=True, timeout=60,
                           check=True)
    view = json.loads(shown.stdout)
    assert view["power"]["summary"] == "Acme PDUs: one outlet per node."
    assert [p["name"] for p in view["power"]["properties"]] == ["pdu_outlet"]


def test_an_empty_entry_point_group_says_the_install_is_stale(monkeypatch):
    from imgfarm.errors import ImgfarmError

    registry.reset_cache()
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    try:
        with pytest.raises(ImgfarmError, match="no boot drivers are registered") as info:
            registry.boot_driver("sim")
        assert "make venv" in str(info.value)
    finally:
        registry.reset_cache()


# --- validation reads the table --------------------------------------------------------

def test_an_unknown_key_is_refused_naming_it_and_the_valid_ones(settings_env):
    with pytest.raises(DriverSettingsError) as info:
        registry.validate_node(ipmi_node(bmc_adress="10.0.0.9"))
    text = str(info.value)
    assert "'bmc_adress' is not a setting of the sim boot driver and the ipmi power driver" in text
    assert "did you mean bmc_address?" in text
    assert "valid settings: kernel_args, bmc_address, bmc_port" in text
    assert "imgfarm driver show ipmi" in text
    # A key of another driver is just as unknown to this node.
    with pytest.raises(DriverSettingsError, match="'loader' is not a setting"):
        registry.validate_node(ipmi_node(loader="grub"))
    registry.validate_node(ipmi_node(kernel_args="imgfarm.delay=3"))


@pytest.mark.parametrize("key,value,why", [
    ("bmc_port", "70000", "not a port number"),
    ("bmc_port", "x", "not a whole number"),
    ("bmc_uefi", "maybe", "not true or false"),
    ("bmc_bootdev", "disk", "not one of pxe, none"),
    ("bmc_cipher_suite", "3a", "not a whole number"),
    ("bmc_username", "root\nreboot", "control character"),
    ("kernel_args", "x" * (MAX_VALUE_CHARS + 1), f"at most {MAX_VALUE_CHARS}"),
    ("bmc_address", {"host": "h"}, "must be text, not dict"),
    ("bmc_address", "", "needs bmc_address"),
])
def test_a_bad_value_is_refused_naming_the_key(settings_env, key, value, why):
    with pytest.raises(DriverSettingsError, match=re.escape(why)) as info:
        registry.validate_node(ipmi_node(**{key: value}))
    assert key in str(info.value)


def test_values_the_table_accepts(settings_env):
    registry.validate_node(ipmi_node(bmc_port=623, bmc_uefi=True, bmc_bootdev="NONE",
                                     bmc_cipher_suite="17"))
    pxe = NodeInfo(name="p1", mac="aa:bb:cc:dd:ee:01", boot_driver="pxe", power_driver="sim",
                   disk="/dev/sda", driver_info={"loader": "GRUB", "agent": "silent"})
    registry.validate_node(pxe)


def test_switching_drivers_leaves_the_old_drivers_keys_behind(settings_env):
    info = {"agent": "silent", "bmc_address": "h", "bmc_port": "623", "typo": "x"}
    assert registry.left_behind(info, ("sim", "ipmi"), ("sim", "xcat")) == ["bmc_address",
                                                                            "bmc_port"]
    assert registry.left_behind(info, ("sim", "ipmi"), ("sim", "ipmi")) == []
    assert registry.left_behind(info, ("gone", "ipmi"), ("sim", "xcat")) == []


# --- what people read ---------------------------------------------------------------------

def test_node_add_help_lists_every_drivers_keys(settings_env):
    from imgfarm.cli.main import app

    out = CliRunner().invoke(app, ["node", "add", "--help"], terminal_width=120)
    assert out.exit_code == 0, out.output
    assert "Driver settings (--set KEY=VALUE) by driver" in out.output
    for drv in registry.all_drivers(built_in_only=True):
        assert f"  {drv.kind} {drv.name}:" in out.output
        for prop in drv.properties:
            assert f"    {prop.name}" in out.output
    assert "bmc_address (required): the BMC's host name or IP address" in out.output


def test_driver_show_and_list(settings_env):
    from imgfarm.cli.main import app

    runner = CliRunner()
    out = runner.invoke(app, ["driver", "show", "ipmi"])
    assert out.exit_code == 0, out.output
    assert "power driver ipmi: ipmitool lanplus" in out.output
    assert "  bmc_address  [required]" in out.output
    assert "  bmc_port  [623 (IMGFARM_IPMI__PORT)]" in out.output
    assert "e.g. --set bmc_port=6230" in out.output
    settings_env.set("IMGFARM_IPMI__PORT", "6231")  # show gives this site's defaults
    view = json.loads(runner.invoke(app, ["driver", "show", "ipmi", "--json"]).output)
    port = next(p for p in view["power"]["properties"] if p["name"] == "bmc_port")
    assert port == {"name": "bmc_port", "description": "the BMC's RMCP+ UDP port",
                    "required": False, "default": "6231", "setting": "IMGFARM_IPMI__PORT",
                    "kind": "port", "choices": [], "example": "6230", "secret": False}
    sim = json.loads(runner.invoke(app, ["driver", "show", "sim", "--json"]).output)
    assert set(sim) == {"name", "boot", "power"}
    listed = json.loads(runner.invoke(app, ["driver", "list", "--json"]).output)
    assert {(e["kind"], e["name"]) for e in listed} >= {("boot", "pxe"), ("power", "ipmi")}
    out = runner.invoke(app, ["driver", "show", "nope"])
    assert out.exit_code == 3 and "unknown driver 'nope'" in out.output
