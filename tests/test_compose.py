"""docker-compose.yml: valid against the Compose Specification, and every imgfarm
service runs a real `imgfarm` command.

There is no Docker engine in CI, so this is what can be checked without one:
the file against the official schema (tests/data/compose-spec.json, copied from
github.com/compose-spec/compose-spec schema/compose-spec.json, Apache-2.0), each
command against the CLI itself (`imgfarm <command> --help` must accept every
word and option), and the production shape the design asks for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from imgfarm.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def imgfarm_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def check_command(command: list[str]) -> str | None:
    """Why `imgfarm <command>` is not a real CLI command, or None if it is."""
    result = CliRunner().invoke(app, [*command, "--help"])
    if result.exit_code != 0:
        return f"exit {result.exit_code}: {result.output.strip()[-300:]}"
    for opt in (w for w in command if w.startswith("--")):
        if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", result.output):
            return f"{opt} is not an option of `imgfarm {command[0]}`"
    return None


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    # The schema declares draft-07 (as "https://json-schema.org/draft-07/schema", without
    # the "#" jsonschema looks for), so name the validator rather than guess.
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # and the schema is really being applied: a wrong type, an unknown key are refused
    assert not validator.is_valid({"services": {"x": {"ports": "8470"}}})
    assert not validator.is_valid({"services": {"x": {"comand": ["api"]}}})


def test_every_service_command_is_a_real_imgfarm_command(compose: dict[str, Any]) -> None:
    services = imgfarm_services(compose)
    assert {"api", "worker", "worker-cpu", "beat", "flower", "migrate"} <= set(services)
    problems = {name: check_command(svc["command"]) for name, svc in services.items()}
    assert {k: v for k, v in problems.items() if v} == {}
    # the check itself catches what it should
    assert check_command(["wroker"]) is not None
    assert check_command(["worker", "--gpu"]) is not None
    assert check_command(["flower", "--address", "0.0.0.0"]) is None


def test_production_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "postgres"} <= set(services)
    commands = {name: svc["command"] for name, svc in imgfarm_services(compose).items()}
    assert commands["worker"] == ["worker"] and commands["worker-cpu"] == ["worker", "--cpu"]
    assert commands["beat"] == ["beat"] and commands["migrate"] == ["db", "upgrade"]
    assert commands["flower"][:1] == ["flower"] and "0.0.0.0" in commands["flower"]
    for name, svc in services.items():
        if name != "migrate":
            assert "healthcheck" in svc, f"{name} has no health check"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for name in ("api", "worker", "worker-cpu", "beat", "flower", "migrate"):
        env = services[name]["environment"]
        for var in ("IMGFARM_DATABASE_URL", "IMGFARM_BROKER_URL", "IMGFARM_IMAGE_STORE",
                    "IMGFARM_IMAGE_STORE_NFS", "IMGFARM_API_URL"):
            assert var in env, f"{name} lacks {var}"
        assert env["IMGFARM_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["IMGFARM_BROKER_URL"].startswith("redis://redis:")
    store = compose["volumes"]["images"]
    assert store["driver_opts"]["type"] == "nfs"
    for name in ("api", "worker", "worker-cpu"):
        assert "images:/srv/imgfarm/images" in services[name]["volumes"]
    assert services["flower"]["environment"]["FLOWER_UNAUTHENTICATED_API"] == "false"


def test_dockerfile_installs_the_tools_and_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    apt = text[text.index("apt-get install"):].split("&&")[0]
    for tool in ("partimage", "partclone", "zstd"):
        assert re.search(rf"\b{tool}\b", apt), f"{tool} is not installed"
    assert "pip install ." in text and 'ENTRYPOINT ["imgfarm"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "tests" in ignored
