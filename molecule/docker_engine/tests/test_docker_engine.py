"""roles/docker_engine on the lab hosts."""

import json

from conftest import assert_check_mode_predicts_no_change, play_recap, run_playbook


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
    # The CIS Docker Benchmark's defaults (2.2, 2.14, 2.16), merged like any other key.
    assert (daemon["icc"], daemon["no-new-privileges"], daemon["userland-proxy"]) == (False, True, False)


def test_the_engines_packages_are_held(host):
    status = host.check_output("dpkg-query --show --showformat '${db:Status-Abbrev} ${Package}\\n' docker.io docker-compose")
    assert [line.split()[0] for line in status.splitlines()] == ["hi", "hi"], status


def test_a_pinned_version_that_differs_is_not_applied_outside_the_upgrade(mainpc, scenario_dir):
    installed = mainpc.check_output("dpkg-query --show --showformat '${Version}' docker.io")
    started = mainpc.check_output("systemctl show docker --property ActiveEnterTimestampMonotonic")
    pins = {"docker_engine_versions": {"docker.io": "0.0.1-not-this-one"}}
    result = run_playbook(scenario_dir / "converge.yml", "-e", json.dumps(pins))
    assert all(counts["changed"] == 0 for counts in play_recap(result.stdout).values()), result.stdout[-3000:]
    assert f"docker.io {installed} installed, 0.0.1-not-this-one pinned" in result.stdout
    assert "run playbooks/upgrade.yml" in result.stdout
    assert mainpc.check_output("dpkg-query --show --showformat '${Version}' docker.io") == installed
    assert mainpc.check_output("systemctl show docker --property ActiveEnterTimestampMonotonic") == started


def test_python_libraries_for_the_modules(host):
    for module in ("docker", "zmq", "jmespath"):
        assert host.run(f"python3 -c 'import {module}'").rc == 0


def test_docker_users(host):
    assert "docker" in host.user("ai-operator").groups


def test_check_mode_after_converge_predicts_no_change(scenario_dir):
    assert_check_mode_predicts_no_change(scenario_dir / "converge.yml")


def test_a_systemd_reload_without_the_gpu_guard_is_refused_before_any_change(mainpc, scenario_dir):
    # site.yml hands over the NVIDIA role's verdict; false: a GPU host without the guard.
    stamp = mainpc.file("/etc/systemd/system/docker.service.d/ai-config-stamp.conf").sha256sum
    result = run_playbook(scenario_dir / "converge.yml", "-e", '{"docker_engine_systemd_reload_safe": false}', check=False)
    assert result.returncode != 0
    assert "the guard against GPU loss is not confirmed there" in result.stdout
    assert all(counts["changed"] == 0 for counts in play_recap(result.stdout).values())
    assert mainpc.file("/etc/systemd/system/docker.service.d/ai-config-stamp.conf").sha256sum == stamp
