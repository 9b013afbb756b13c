"""Both container sets, end to end: CURVE health, cross-machine registration, idempotence, secrets."""

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import zmq.auth
from conftest import (PROJECT_DIR, all_healthy, assert_no_secret, catalogue, containers, health, health_port, lab_host,
                      probe_on_hosts, run_playbook, secret_keys)

# The service catalogue of each machine, from the lab inventory.
MAINPC_SERVICES = catalogue("mainpc")
PC2_SERVICES = catalogue("pc2")
SDT_PORT = MAINPC_SERVICES["system-digital-twin"]


def test_every_service_is_healthy_over_curve():
    # On each host, as the deploy's gate probes: the health ports, with the health probe's key.
    assert health() == all_healthy()


@pytest.mark.parametrize(("machine", "services"), [("mainpc", MAINPC_SERVICES), ("pc2", PC2_SERVICES)])
def test_compose_shows_every_container_healthy(request, machine, services):
    host = request.getfixturevalue(machine)
    rows = host.check_output(f"docker compose -p {machine} ps --format '{{{{.Name}}}} {{{{.Health}}}}'").splitlines()
    assert dict(row.split() for row in rows) == {name: "healthy" for name in services}


def test_containers_are_hardened(mainpc):
    config = json.loads(mainpc.check_output("docker inspect task-router"))[0]["HostConfig"]
    assert config["Privileged"] is False
    assert config["CapDrop"] == ["ALL"]
    assert config["ReadonlyRootfs"] is True
    assert "no-new-privileges:true" in config["SecurityOpt"]
    assert config["Memory"] == 8192 * 1024 * 1024
    assert config["LogConfig"]["Config"]["max-size"] == "10m"
    user = mainpc.check_output("docker inspect --format '{{.Config.User}}' task-router")
    assert user == "10001:10001"


def test_pc2_reaches_the_registry_by_name_and_registers(mainpc, pc2):
    reply = pc2.check_output(
        f"docker exec translator-agent python3 /app/agent.py query --host system-digital-twin --port {SDT_PORT} "
        "--json '{\"action\": \"health_check\"}'"
    )
    assert json.loads(reply)["status"] == "ok"
    listing = json.loads(mainpc.check_output(
        f"docker exec system-digital-twin python3 /app/agent.py query --host 127.0.0.1 --port {SDT_PORT} "
        "--json '{\"action\": \"list_agents\"}'"
    ))
    registered = {agent["name"]: agent["location"] for agent in listing["agents"]}
    for name in PC2_SERVICES:
        assert registered.get(name) == "PC2"


def test_a_client_whose_key_is_not_authorised_gets_auth_failed():
    # Keys go by file, not as module arguments: a Z85 key may contain "{{", which an
    # ad-hoc command line would template.
    mainpc = lab_host("ai-lab-mainpc")
    with tempfile.TemporaryDirectory() as tmp:
        zmq.auth.create_certificates(tmp, "intruder")
        shutil.copy(PROJECT_DIR / "certificates" / "server.key", tmp)
        # Not /tmp: docker cp cannot write into the lab host's tmpfs mounts.
        mainpc.check_output("rm -rf /var/tmp/intruder")
        subprocess.run(["docker", "cp", tmp, "ai-lab-mainpc:/var/tmp/intruder"], check=True)
    try:
        result = probe_on_hosts(
            {"ai-lab-mainpc": [{"name": "system-digital-twin",
                                "url": f"tcp://127.0.0.1:{health_port('system-digital-twin', 'mainpc')}"}]},
            certificates_dir="/var/tmp/intruder", client_key_name="intruder")["ai-lab-mainpc"]
    finally:
        mainpc.check_output("rm -rf /var/tmp/intruder")
    assert [e["state"] for e in result["endpoints"]] == ["auth_failed"]
    assert result["endpoints"][0]["reply"] is None


def test_secret_key_files_are_0600_on_the_hosts(host):
    certificates = host.file("/etc/ai-system/certificates")
    assert certificates.mode == 0o700 and certificates.uid == 10001
    for name in ("server.key_secret", "client.key_secret"):
        secret = host.file(f"/etc/ai-system/certificates/{name}")
        assert secret.mode == 0o600 and secret.uid == 10001
    probe_secret = host.file("/etc/ai-system/health-probe/client.key_secret")
    assert probe_secret.mode == 0o600 and probe_secret.user == "root"


def test_no_secret_key_file_is_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True).stdout
    assert not [f for f in tracked.splitlines() if f.endswith("key_secret")]
    ignored = subprocess.run(["git", "check-ignore", "certificates/server.key_secret"], cwd=PROJECT_DIR,
                             capture_output=True, text=True, check=False)
    assert ignored.returncode == 0


def test_second_run_changes_nothing_restarts_nothing_and_prints_no_secret(mainpc, pc2):
    before = {"mainpc": containers(mainpc, "mainpc"), "pc2": containers(pc2, "pc2")}
    assert len(before["mainpc"]) == len(MAINPC_SERVICES) and len(before["pc2"]) == len(PC2_SERVICES)
    result = run_playbook(PROJECT_DIR / "site.yml", "--diff")
    assert " changed=0 " in result.stdout.split("PLAY RECAP")[-1]
    assert "changed=1" not in result.stdout.split("PLAY RECAP")[-1]
    after = {"mainpc": containers(mainpc, "mainpc"), "pc2": containers(pc2, "pc2")}
    assert after == before
    assert len(secret_keys()) == 3
    assert_no_secret(result.stdout, result.stderr)
