"""The lab takes production's path: SSH as `deploy` with sudo, images pulled from a TLS
registry with auth, the host firewall on. The controller is never escalated."""

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import LAB_HOSTS, LAB_STATE, PROJECT_DIR, REGISTRY, host_address, lab_host, run_playbook, services

ANSIBLE = Path(sys.executable).parent / "ansible"
ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"
INVENTORIES = ("inventory/lab", "inventory/production")


def ansible(pattern, *args, inventory="inventory/lab"):
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT_DIR / "ansible.cfg"), ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json")
    result = subprocess.run([str(ANSIBLE), pattern, "-i", inventory, *args], cwd=PROJECT_DIR, env=env,
                            text=True, capture_output=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # The project's timing callbacks print around the JSON document.
    document = result.stdout[result.stdout.index("{\n"):result.stdout.rindex("}") + 1]
    return json.loads(document)["plays"][0]["tasks"][0]["hosts"]


def me():
    return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


def inventory_host(name, inventory):
    out = subprocess.run([str(ANSIBLE_INVENTORY), "-i", inventory, "--host", name], cwd=PROJECT_DIR,
                         text=True, capture_output=True, check=True)
    return json.loads(out.stdout)


# SSH as deploy, with sudo

def test_the_lab_inventory_uses_productions_connection_settings():
    for name in LAB_HOSTS:
        lab, prod = inventory_host(name, "inventory/lab"), inventory_host("ai-pc2", "inventory/production")
        assert "ansible_connection" not in lab  # ssh, Ansible's default, as in production
        for key in ("ansible_user", "ansible_become"):
            assert lab[key] == prod[key]
        assert lab["ansible_user"] == "deploy" and lab["ansible_become"] is True
        assert lab["ansible_host"] == "127.0.0.1" and 2200 <= lab["ansible_port"] < 2300


def test_every_host_is_reached_over_ssh_as_deploy_with_sudo():
    plain = ansible("ai_hosts", "-m", "ansible.builtin.command", "-a", "id -un", "-e", "ansible_become=false")
    escalated = ansible("ai_hosts", "-m", "ansible.builtin.command", "-a", "id -un")
    assert {h: r["stdout"] for h, r in plain.items()} == {h: "deploy" for h in LAB_HOSTS}
    assert {h: r["stdout"] for h, r in escalated.items()} == {h: "root" for h in LAB_HOSTS}
    for name in LAB_HOSTS:
        log = lab_host(name).check_output("journalctl -u ssh --no-pager")
        assert "Accepted publickey for deploy" in log


def test_ssh_takes_keys_only_and_checks_host_keys():
    known_hosts = (LAB_STATE / "ssh" / "known_hosts").read_text()
    for name in LAB_HOSTS:
        port = inventory_host(name, "inventory/lab")["ansible_port"]
        assert f"[127.0.0.1]:{port} ssh-ed25519 " in known_hosts
        config = lab_host(name).check_output("sshd -T")
        assert "passwordauthentication no" in config and "permitrootlogin no" in config
    assert oct((LAB_STATE / "ssh" / "id_ed25519").stat().st_mode & 0o777) == "0o600"
    # A host key the lab's known_hosts does not hold is refused, not accepted.
    port = inventory_host("ai-lab-pc2", "inventory/lab")["ansible_port"]
    result = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "UserKnownHostsFile=/dev/null",
                             "-o", "StrictHostKeyChecking=yes", "-i", str(LAB_STATE / "ssh" / "id_ed25519"),
                             "-p", str(port), "deploy@127.0.0.1", "true"], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "Host key verification failed" in result.stderr


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_the_controller_is_never_escalated(inventory):
    assert inventory_host("localhost", inventory)["ansible_become"] is False
    # Were the controller escalated, this would run as `nobody` (su as root needs no password).
    result = ansible("localhost", "-m", "ansible.builtin.command", "-a", "id -un", "-e", "ansible_become_user=nobody",
                     "-e", "ansible_become_method=su", "-e", "ansible_become_flags='-s /bin/sh'", inventory=inventory)
    assert result["localhost"]["stdout"] == me()


def test_controller_tasks_delegated_from_a_host_run_as_the_invoking_user(tmp_path):
    # As curve_certificates makes and reads keys: a task of an escalated host, delegated to
    # localhost. Were localhost escalated, it would run as `nobody` (or fail to).
    playbook = tmp_path / "delegated.yml"
    playbook.write_text("- hosts: ai-lab-pc2\n  gather_facts: false\n  tasks:\n"
                        "    - {ansible.builtin.command: id -un, delegate_to: localhost, register: who}\n"
                        "    - {ansible.builtin.debug: {msg: 'controller user: {{ who.stdout }}'}}\n")
    result = run_playbook(playbook, "-e", "ansible_become_user=nobody", "-e", "ansible_become_method=su",
                          "-e", "ansible_become_flags='-s /bin/sh'")
    assert f"controller user: {me()}" in result.stdout
    for path in (PROJECT_DIR / "certificates").iterdir():  # the controller's key files are the operator's
        assert path.owner() == me()


def test_production_host_names_differ_from_group_names():
    result = subprocess.run([str(ANSIBLE_INVENTORY), "-i", "inventory/production", "--list"], cwd=PROJECT_DIR,
                            text=True, capture_output=True, check=True)
    assert "Found both group and host with same name" not in result.stderr


# Images from the registry, over verified TLS, with auth

def test_every_agent_image_comes_from_the_registry(host):
    images = host.check_output("docker ps --filter label=com.docker.compose.project --format '{{.Image}}'").split()
    assert images and all(image.startswith(f"{REGISTRY}/ai-system/agent:") for image in images)
    digests = host.check_output("docker image inspect --format '{{json .RepoDigests}}' %s", images[0])
    assert f"{REGISTRY}/ai-system/agent@sha256:" in digests


def test_hosts_trust_the_registry_ca_and_hold_credentials_privately(host):
    ca = host.file(f"/etc/docker/certs.d/{REGISTRY}/ca.crt")
    assert ca.exists and ca.content_string == (LAB_STATE / "registry" / "ca.crt").read_text()
    docker_config = host.file("/root/.docker/config.json")
    assert docker_config.mode == 0o600 and REGISTRY in json.loads(docker_config.content_string)["auths"]
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert not daemon.get("insecure-registries")


def test_the_registry_requires_auth_over_tls():
    context = ssl.create_default_context(cafile=str(LAB_STATE / "registry" / "ca.crt"))
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen("https://127.0.0.1:5000/v2/", context=context, timeout=5)  # noqa: S310
    assert denied.value.code == 401
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen("https://127.0.0.1:5000/v2/", context=ssl.create_default_context(), timeout=5)  # noqa: S310
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)


# The firewall

def reachable(source, address, port, proto="tcp"):
    """Whether `source` gets a TCP connection to address:port within 3 s."""
    script = ("import socket,sys; s=socket.socket(); s.settimeout(3)\n"
              "try: s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
              "except OSError as e: print('closed', e)")
    return source.check_output("python3 -c %s %s %s", script, address, str(port)).startswith("open")


def test_the_firewall_is_on_and_denies_by_default(host):
    status = host.check_output("ufw status verbose")
    assert "Status: active" in status and "deny (incoming)" in status


@pytest.mark.parametrize(("source", "target"), [("ai-lab-pc2", "ai-lab-mainpc"), ("ai-lab-mainpc", "ai-lab-pc2")])
def test_swarm_and_published_ports_are_open_to_the_peer_and_nothing_else(source, target):
    src, dst = lab_host(source), lab_host(target)
    # Swarm: management (manager only) and gossip on both.
    for port in ([2377] if target == "ai-lab-mainpc" else []) + [7946]:
        assert reachable(src, host_address(target), port), port
    rules = dst.check_output("ufw show added")
    # The services the catalogue publishes (the entry points): their main and extra ports are
    # open to the peer, on the host's address.
    published = [port for entry in services(target) if entry.get("publish")
                 for port in [entry["port"], *entry.get("extra_ports", [])]]
    assert published
    for port in published:
        assert f"ufw allow from {host_address(source)} to any port {port} proto tcp" in rules
    # The stand-in agents listen on their main port only.
    for entry in services(target):
        if entry.get("publish"):
            assert reachable(src, host_address(target), entry["port"]), entry["name"]
    # A port a host process opens, outside the catalogue, is not reachable from the peer.
    dst.check_output("systemd-run --collect --unit lab-stray-listener python3 -m http.server 9999")
    try:
        assert any(reachable(dst, "127.0.0.1", 9999) or time.sleep(0.5) for _ in range(20))  # it listens
        assert not reachable(src, host_address(target), 9999)
    finally:
        dst.run("systemctl stop lab-stray-listener")


@pytest.mark.parametrize(("source", "target"), [("ai-lab-pc2", "ai-lab-mainpc"), ("ai-lab-mainpc", "ai-lab-pc2")])
def test_unpublished_services_are_closed_on_the_host_and_reached_over_the_shared_network(source, target):
    """CIS Docker 5.14: a service no client outside the overlay needs is not published on the
    host at all; the other machine still reaches it by name over ai-shared-network."""
    src, dst = lab_host(source), lab_host(target)
    hidden = [entry for entry in services(target) if not entry.get("publish")]
    assert hidden
    bindings = dst.check_output("docker ps --format '{{.Names}} {{.Ports}}'")
    assert "0.0.0.0:" not in bindings and ":::" not in bindings, bindings
    for entry in hidden:
        assert not reachable(src, host_address(target), entry["port"]), entry["name"]
    # A container of the source machine on the shared network reaches a shared, unpublished one.
    shared = next(entry for entry in hidden if entry.get("shared"))
    client = next(entry["name"] for entry in services(source) if entry.get("shared"))
    script = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('open')")
    assert src.check_output("docker exec %s python3 -c %s %s %s", client, script, shared["name"],
                            str(shared["port"])) == "open"
