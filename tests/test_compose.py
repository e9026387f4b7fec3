"""compose.yaml is the production shape (no Docker engine runs here, so it is checked as data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


def test_services_and_commands() -> None:
    services = load()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "relay", "worker"}
    assert command(services["migrate"]) == ["poolrelay", "migrate"]
    assert command(services["relay"])[:2] == ["poolrelay", "serve"]
    assert "--host" in command(services["relay"]) and "0.0.0.0" in command(services["relay"])
    assert command(services["worker"]) == ["poolrelay", "worker"]
    assert services["relay"]["deploy"]["replicas"] == 2
    assert services["migrate"]["restart"] == "no"


def test_redis_persists_and_postgres_has_a_volume() -> None:
    data = load()
    redis = data["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert any(
        "/var/lib/postgresql/data" in str(v) for v in data["services"]["postgres"]["volumes"]
    )
    assert {"pgdata", "redisdata"} <= set(data["volumes"])


def test_healthchecks_and_dependencies() -> None:
    services = load()["services"]
    for name in ("postgres", "redis", "relay"):
        check = services[name]["healthcheck"]
        assert check["test"] and check["interval"] and check["retries"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/readyz" in " ".join(services["relay"]["healthcheck"]["test"])
    for name in ("relay", "worker"):
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_secrets_come_from_an_env_file() -> None:
    services = load()["services"]
    for name in ("migrate", "relay", "worker"):
        service = services[name]
        assert service["env_file"]
        env = service["environment"]
        assert env["POOLRELAY_DATABASE_URL"].startswith("postgresql://")
        assert env["POOLRELAY_REDIS_URL"].startswith("redis://")
        assert "POOLRELAY_ENCRYPTION_KEYS" not in env and "POOLRELAY_ADMIN_TOKEN" not in env
    example = (ROOT / "deploy.env.example").read_text()
    assert "POOLRELAY_ENCRYPTION_KEYS=" in example and "POOLRELAY_ADMIN_TOKEN=" in example
    assert "deploy.env" in (ROOT / ".gitignore").read_text()
