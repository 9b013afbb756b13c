"""End-to-end state of the lab after site.yml."""

import json

from conftest import assert_check_mode_predicts_no_change


def test_hosts_run_systemd(host):
    state = host.run("systemctl is-system-running").stdout.strip()
    assert state in {"running", "degraded"}


def test_docker_engine_runs_and_rotates_logs(host):
    assert host.service("docker").is_running
    assert host.service("docker").is_enabled
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["log-driver"] == "json-file"
    assert daemon["log-opts"]["max-size"] == "10m"
    assert host.run("docker compose version").rc == 0


def test_hosts_form_one_swarm(mainpc, pc2):
    nodes = mainpc.check_output("docker node ls --format '{{.Hostname}} {{.Status}}'").splitlines()
    assert sorted(nodes) == ["ai-lab-mainpc Ready", "ai-lab-pc2 Ready"]
    assert pc2.check_output("docker info --format '{{.Swarm.LocalNodeState}}'") == "active"


def test_pc2_reaches_mainpc_by_name_over_the_shared_network(pc2):
    out = pc2.check_output(
        # As root: ping needs a raw socket (the anchor image runs as nobody).
        "docker run --rm --user 0 --network ai-shared-network ai-system/network-anchor:2 "
        "ping -c 1 -W 3 ai-network-anchor-ai-lab-mainpc"
    )
    assert "1 packets received" in out


def test_check_mode_after_converge_predicts_no_change(scenario_dir):
    assert_check_mode_predicts_no_change(scenario_dir / "converge.yml")
