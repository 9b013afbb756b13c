"""roles/docker_engine on the lab hosts."""

import json

from conftest import assert_check_mode_predicts_no_change


def test_engine_runs_enabled_with_compose_v2(host):
    assert host.service("docker").is_running
    assert host.service("docker").is_enabled
    assert host.package("docker.io").is_installed
    assert host.run("docker compose version").stdout.startswith("Docker Compose version v2") or \
        "2." in host.check_output("docker compose version --short")


def test_engine_runs_a_container(host):
    # No registry: an image from scratch with the host's busybox.
    host.check_output("apt-get install -y -qq busybox-static >/dev/null && mkdir -p /tmp/img && "
                      "cp /bin/busybox /tmp/img/ && printf 'FROM scratch\\nCOPY busybox /busybox\\n' > /tmp/img/Dockerfile")
    host.check_output("DOCKER_BUILDKIT=0 docker build -q -t verify/busybox /tmp/img")
    assert host.check_output("docker run --rm verify/busybox /busybox echo container-ran") == "container-ran"


def test_daemon_json_is_merged_with_log_rotation(host):
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["debug"] is False  # written by someone else before the role ran
    assert daemon["log-driver"] == "json-file"
    assert daemon["log-opts"] == {"max-size": "10m", "max-file": "3"}
    assert json.loads(host.check_output("docker info --format '{{json .LoggingDriver}}'")) == "json-file"


def test_python_libraries_for_the_modules(host):
    for module in ("docker", "zmq", "jmespath"):
        assert host.run(f"python3 -c 'import {module}'").rc == 0


def test_docker_users(host):
    assert "docker" in host.user("ai-operator").groups


def test_check_mode_after_converge_predicts_no_change(scenario_dir):
    assert_check_mode_predicts_no_change(scenario_dir / "converge.yml")
