"""roles/docker_engine/filter_plugins: the engine's packages from dpkg-query's output."""

import importlib.util
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("docker_engine_filters", PROJECT / "roles/docker_engine/filter_plugins/docker_engine.py")
filters = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(filters)

CORE = ["docker.io", "docker-compose"]
PACKAGES = CORE + ["python3-docker"]


def state(lines, versions=None):
    return filters.docker_engine_packages_state(lines, PACKAGES, CORE, versions)


def test_missing_packages_and_their_pinned_apt_names():
    found = state(["ii  docker.io 26.1.5+dfsg1-9+b9", "un  docker-compose <none>"], {"docker-compose": "2.26.1-4"})
    assert found["missing"] == ["docker-compose", "python3-docker"]
    assert found["apt_names"] == ["docker-compose=2.26.1-4", "python3-docker"]
    assert found["unheld"] == ["docker.io"]


def test_held_packages_count_as_installed_and_held():
    found = state(["hi  docker.io 26.1.5+dfsg1-9+b9", "hi  docker-compose 2.26.1-4", "ii  python3-docker 7.1.0-2"])
    assert found["missing"] == [] and found["unheld"] == []
    assert found["installed"]["docker.io"] == {"held": True, "version": "26.1.5+dfsg1-9+b9"}


def test_a_pinned_version_that_differs_waits_for_the_upgrade():
    found = state(["hi  docker.io 26.1.5+dfsg1-9+b9", "hi  docker-compose 2.26.1-4", "ii  python3-docker 7.1.0-2"],
                  {"docker.io": "26.1.5+dfsg1-9+b10", "docker-compose": "2.26.1-4"})
    assert found["version_drift"] == {"docker.io": ["26.1.5+dfsg1-9+b9", "26.1.5+dfsg1-9+b10"]}
    assert found["upgrade_names"] == ["docker.io=26.1.5+dfsg1-9+b10"]
    assert found["drift_text"] == "docker.io 26.1.5+dfsg1-9+b9 installed, 26.1.5+dfsg1-9+b10 pinned"
    assert found["missing"] == []


def test_removed_or_half_installed_packages_are_missing():
    found = state(["rc  docker.io 26.1.5", "iU  docker-compose 2.26.1-4"])
    assert found["missing"] == ["docker.io", "docker-compose", "python3-docker"]


NVIDIA = importlib.util.spec_from_file_location(
    "nvidia_filters", PROJECT / "roles/nvidia_container_toolkit/filter_plugins/nvidia_container_toolkit.py")
nvidia = importlib.util.module_from_spec(NVIDIA)
NVIDIA.loader.exec_module(nvidia)


def test_the_toolkit_installs_missing_packages_pinned_and_changes_versions_only_on_upgrade():
    packages = ["nvidia-container-toolkit", "nvidia-container-toolkit-base"]
    lines = ["hi  nvidia-container-toolkit 1.17.8-1", "un  nvidia-container-toolkit-base <none>"]
    pins = {"nvidia-container-toolkit": "1.18.0-1", "nvidia-container-toolkit-base": "1.18.0-1"}
    plan = nvidia.nvidia_container_toolkit_plan(lines, packages, pins)
    assert plan["install"] == ["nvidia-container-toolkit-base=1.18.0-1"]
    assert plan["drift_text"] == "nvidia-container-toolkit 1.17.8-1 installed, 1.18.0-1 pinned"
    assert plan["unheld"] == []
    upgrade = nvidia.nvidia_container_toolkit_plan(lines, packages, pins, upgrade=True)
    assert upgrade["install"] == ["nvidia-container-toolkit=1.18.0-1", "nvidia-container-toolkit-base=1.18.0-1"]
