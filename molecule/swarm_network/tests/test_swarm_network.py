"""roles/swarm_network on the lab hosts."""

import json

from conftest import assert_check_mode_predicts_no_change, play_recap, run_playbook


def test_one_swarm_with_the_right_advertise_addresses(mainpc, pc2):
    nodes = json.loads("[" + ",".join(mainpc.check_output(
        "docker node ls -q | xargs docker node inspect --format '{{json .}}'").splitlines()) + "]")
    addresses = {n["Description"]["Hostname"]: n["Status"]["Addr"] for n in nodes}
    assert addresses == {"ai-lab-mainpc": "192.168.100.16", "ai-lab-pc2": "192.168.100.17"}
    assert mainpc.check_output("docker info --format '{{.Swarm.ControlAvailable}}'") == "true"
    assert pc2.check_output("docker info --format '{{.Swarm.ControlAvailable}}'") == "false"


def test_networks(mainpc, pc2):
    shared = json.loads(mainpc.check_output("docker network inspect ai-shared-network"))[0]
    assert shared["Driver"] == "overlay" and shared["Attachable"] is True and shared["Scope"] == "swarm"
    assert json.loads(mainpc.check_output("docker network inspect mainpc-network"))[0]["Driver"] == "bridge"
    assert json.loads(pc2.check_output("docker network inspect pc2-network"))[0]["Driver"] == "bridge"


def test_compose_on_the_worker_can_use_the_overlay(pc2):
    pc2.check_output(
        "mkdir -p /tmp/overlay-compose && printf 'name: overlaytest\\nservices:\\n  probe:\\n"
        "    image: ai-system/network-anchor:2\\n    networks: [ai-shared-network]\\n"
        "networks:\\n  ai-shared-network:\\n    external: true\\n' > /tmp/overlay-compose/compose.yaml"
    )
    try:
        pc2.check_output("docker compose -f /tmp/overlay-compose/compose.yaml up -d")
        # As root: ping needs a raw socket (the anchor image runs as nobody).
        out = pc2.check_output("docker compose -f /tmp/overlay-compose/compose.yaml exec --user 0 probe /bin/busybox "
                               "ping -c 1 -W 3 ai-network-anchor-ai-lab-mainpc")
        assert "1 packets received" in out
    finally:
        pc2.run("docker compose -f /tmp/overlay-compose/compose.yaml down")


def test_check_mode_after_converge_predicts_no_change(scenario_dir):
    assert_check_mode_predicts_no_change(scenario_dir / "converge.yml")


def test_limit_to_the_worker_needs_only_read_only_lookups_on_the_manager(scenario_dir):
    result = run_playbook(scenario_dir / "converge.yml", "--limit", "pc2")
    assert set(play_recap(result.stdout)) == {"ai-lab-pc2"}
    assert play_recap(result.stdout)["ai-lab-pc2"]["changed"] == 0


def test_a_host_in_another_swarm_is_an_error_and_rejoins_once_it_left(pc2, scenario_dir):
    pc2.check_output("docker swarm leave --force && docker swarm init --advertise-addr 127.0.0.1")
    try:
        result = run_playbook(scenario_dir / "converge.yml", check=False)
        assert result.returncode != 0
        assert "outside the swarm of ai-lab-mainpc" in result.stdout
        assert "docker swarm leave" in result.stdout
    finally:
        pc2.check_output("docker swarm leave --force")
    run_playbook(scenario_dir / "converge.yml")
    assert pc2.check_output("docker info --format '{{.Swarm.LocalNodeState}}'") == "active"
