"""Nightly drift checks: report runtime and file drift, never change a host, never leak a secret."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_DIR, assert_no_secret, run_playbook


def drift_check(report_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ANSIBLE_CONFIG", None)
    return subprocess.run([sys.executable, str(PROJECT_DIR / "scripts" / "drift-check"), "-i",
                           str(PROJECT_DIR / "inventory" / "lab"), "--report", str(report_dir)],
                          cwd=PROJECT_DIR, env=env, text=True, capture_output=True, check=False)


def report_text(report_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in report_dir.rglob("*") if p.is_file() and not p.is_symlink())


SNAPSHOT = ("docker ps -aq | xargs docker inspect --format '{{.Name}} {{.Id}} {{.State.StartedAt}} {{.State.Status}}'; "
            "stat -c '%n %a %U %s %Y' /etc/docker/daemon.json /etc/ai-system/certificates/* /opt/ai-system/*/compose.yaml; "
            "sha256sum /etc/docker/daemon.json /etc/ai-system/certificates/* /opt/ai-system/*/compose.yaml; "
            "docker info --format '{{.Swarm.LocalNodeState}}'")


def snapshot(host):
    return host.check_output(SNAPSHOT)


@pytest.fixture(scope="module", autouse=True)
def repair_afterwards():
    yield
    run_playbook(PROJECT_DIR / "site.yml")


def test_converged_lab_has_no_drift(tmp_path):
    result = drift_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_is_reported_and_nothing_is_changed(mainpc, pc2, tmp_path):
    pc2.check_output("docker stop health-monitor")
    pc2.check_output("chmod 0644 /etc/ai-system/certificates/client.key_secret")
    mainpc.check_output("sed -i 's/\"10m\"/\"20m\"/' /etc/docker/daemon.json")
    mainpc.check_output("docker rm -f responder")
    before = {"mainpc": snapshot(mainpc), "pc2": snapshot(pc2)}

    result = drift_check(tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr
    after = {"mainpc": snapshot(mainpc), "pc2": snapshot(pc2)}
    assert after == before  # the check changed nothing: containers, files, modes, swarm
    report = report_text(tmp_path)
    for finding in ("health-monitor: container exited", "responder: container missing",
                    "/etc/docker/daemon.json", "Distribute the secret keys", "ai-lab-mainpc", "ai-lab-pc2"):
        assert finding in report, finding
    assert_no_secret(report, result.stdout, result.stderr)


def test_a_host_that_left_the_swarm_is_drift(pc2, tmp_path):
    pc2.check_output("docker swarm leave --force")
    result = drift_check(tmp_path)
    assert result.returncode == 2
    assert "Join the swarm" in report_text(tmp_path)
    assert pc2.check_output("docker info --format '{{.Swarm.LocalNodeState}}'") == "inactive"
