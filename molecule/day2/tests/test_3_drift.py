"""Nightly drift checks: report runtime and file drift, never change a host, never leak a secret."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_DIR, assert_no_secret, play_recap, run_playbook


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


# Each role reads the files it manages once (library/managed_files.py) and runs a file,
# copy or template task only for a path that differs. A change by hand to any of them must
# still be reported by drift-check, and repaired by the next run, which must be the last.
HAND_CHANGES = {
    "mainpc": {
        "chmod 0700 /etc/systemd/system/docker.service.d": "Create the engine's systemd drop-in directory",
        "echo '# by hand' >> /etc/systemd/system/docker.service.d/ai-config-stamp.conf":
            "Record at each engine start the daemon.json it started with",
        "chmod 0700 /usr/local/sbin/ai-overlay-restart": "Install the overlay restart helper",
        "chmod 0600 /opt/ai-system/mainpc/compose.yaml": "Write the Compose project",
    },
    "pc2": {
        "chmod 0700 /etc/docker": "Create /etc/docker",
        "rm /etc/systemd/system/docker.service.wants/ai-overlay-restart.service":
            "Run the overlay restart helper after every engine start",
        "echo '# by hand' >> /etc/systemd/system/ai-overlay-restart.service": "Install the overlay restart unit",
        "echo '# by hand' >> '/etc/docker/certs.d/ai-lab-registry:5000/ca.crt'": "Install the registry's CA certificate",
        "chmod 0700 /opt/ai-system/pc2/last-good": "Create the project and log directories",
        "echo 'BY_HAND=1' >> /opt/ai-system/pc2/env.pc2": "Write the agents' environment file",
        "chmod 0755 /etc/ai-system/certificates": "Create the host's certificate directories (not world-readable)",
    },
}


def changed_tasks(output: str) -> dict[str, set[str]]:
    """{task name: hosts it changed} from ansible-playbook's default output (names as shown:
    a name with a template shows the first host's value)."""
    changed: dict[str, set[str]] = {}
    task = ""
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line[6:line.rindex("]")].split(" : ", 1)[-1]
        elif line.startswith("changed: ["):
            changed.setdefault(task, set()).add(line[10:line.index("]")])
    return changed


def test_every_file_changed_by_hand_is_reported_and_repaired(mainpc, pc2, tmp_path):
    hosts = {"mainpc": mainpc, "pc2": pc2}
    for name, changes in HAND_CHANGES.items():
        for command in changes:
            hosts[name].check_output(command)

    result = drift_check(tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    report = report_text(tmp_path)
    missing = [task for changes in HAND_CHANGES.values() for task in changes.values() if f". {task}" not in report]
    assert not missing, f"drift-check did not report: {missing}\n{result.stdout[-3000:]}"

    repaired = changed_tasks(run_playbook(PROJECT_DIR / "site.yml").stdout)
    for name, changes in HAND_CHANGES.items():
        for task in changes.values():
            hosts_repaired = set().union(*(done for title, done in repaired.items() if title.startswith(task)))
            assert f"ai-lab-{name}" in hosts_repaired, f"{task} did not repair ai-lab-{name}: {repaired}"
    assert pc2.file("/etc/systemd/system/docker.service.wants/ai-overlay-restart.service").is_symlink
    assert pc2.file("/etc/ai-system/certificates").mode == 0o700
    assert "BY_HAND" not in pc2.file("/opt/ai-system/pc2/env.pc2").content_string

    again = run_playbook(PROJECT_DIR / "site.yml")
    assert all(counts["changed"] == 0 for counts in play_recap(again.stdout).values()), again.stdout[-3000:]
