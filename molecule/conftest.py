"""Fixtures shared by the lab scenarios' testinfra tests (molecule/<scenario>/tests).

The lab hosts are containers of the local engine, so testinfra reaches them with its
docker backend; playbook runs use the project's ansible.cfg (inventory/lab).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import testinfra
import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
LAB_HOSTS = ("ai-lab-mainpc", "ai-lab-pc2")
RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)
LAB_INVENTORY = PROJECT_DIR / "inventory" / "lab"
CONTRACT_DEFAULTS = PROJECT_DIR / "roles" / "ai_contract" / "defaults" / "main.yml"


# The lab inventory: the tests read the service catalogue and the hosts' addresses from it
# instead of repeating them. Plain values only (names, ports, addresses, machine types, group
# membership): nothing here templates Jinja.

@functools.cache
def lab_inventory() -> dict:
    """`ansible-inventory --list` of the lab inventory, read once per test session."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT_DIR / "ansible.cfg"))
    cmd = [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(LAB_INVENTORY), "--list"]
    result = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, text=True, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def inventory_hosts(group: str) -> list[str]:
    """The hosts of a group of the lab inventory and of its child groups, in inventory order."""
    inventory = lab_inventory()
    if group not in inventory:
        raise KeyError(f"no group {group!r} in {LAB_INVENTORY}")
    found: list[str] = []
    for name in [*inventory[group].get("hosts", []),
                 *(h for child in inventory[group].get("children", []) for h in inventory_hosts(child))]:
        if name not in found:
            found.append(name)
    return found


def inventory_hostvars(host: str) -> dict:
    """The variables the lab inventory gives a host, untemplated (read plain values only)."""
    hostvars = lab_inventory()["_meta"]["hostvars"]
    if host not in hostvars:
        raise KeyError(f"no host {host!r} in {LAB_INVENTORY}")
    return hostvars[host]


def _hosts_of(group_or_host: str) -> list[str]:
    return [group_or_host] if group_or_host in lab_inventory()["_meta"]["hostvars"] else inventory_hosts(group_or_host)


def _one_host(group_or_host: str) -> str:
    hosts = _hosts_of(group_or_host)
    if len(hosts) != 1:
        raise ValueError(f"{group_or_host!r} names {len(hosts)} hosts of {LAB_INVENTORY}, not one: {hosts}")
    return hosts[0]


def services(group_or_host: str = "ai_hosts") -> list[dict]:
    """The ai_stack_services entries of a host, or of every host of a group (inventory order)."""
    return [s for host in _hosts_of(group_or_host) for s in inventory_hostvars(host).get("ai_stack_services", [])]


def service(name: str, group_or_host: str = "ai_hosts") -> dict:
    """One service's catalogue entry (name, port, optional health_port, extra_ports, shared, ...)."""
    found = [s for s in services(group_or_host) if s["name"] == name]
    if len(found) != 1:
        raise KeyError(f"{len(found)} services named {name!r} in the catalogue of {group_or_host}")
    return found[0]


def catalogue(group_or_host: str = "ai_hosts") -> dict[str, int]:
    """{service name: main port} of a host, or of every host of a group: catalogue("pc2")."""
    return {s["name"]: int(s["port"]) for s in services(group_or_host)}


def host_address(group_or_host: str) -> str:
    """The ai_host_address of a host, or of the one host of a group: host_address("pc2")."""
    return str(inventory_hostvars(_one_host(group_or_host))["ai_host_address"])


def health_port(name: str, group_or_host: str = "ai_hosts") -> int:
    """A service's health port: its health_port, else its port + ai_health_port_offset (the
    contract's default, roles/ai_contract/defaults/main.yml, unless the inventory sets a number)."""
    entry = service(name, group_or_host)
    if entry.get("health_port") is not None:
        return int(entry["health_port"])
    host = next(h for h in _hosts_of(group_or_host) if entry in inventory_hostvars(h).get("ai_stack_services", []))
    offset = inventory_hostvars(host).get("ai_health_port_offset")
    if not isinstance(offset, int):
        offset = yaml.safe_load(CONTRACT_DEFAULTS.read_text())["ai_health_port_offset"]
    return int(entry["port"]) + int(offset)


def service_endpoints(host: str) -> list[dict[str, str]]:
    """zmq_health endpoints of every service of one host, as the deploy's gate probes them on
    that host: its health port on 127.0.0.1 (main ports are not published, but the entry points)."""
    return [{"name": name, "url": f"tcp://127.0.0.1:{health_port(name, host)}"} for name in catalogue(host)]


def probe_on_hosts(endpoints: dict[str, list[dict]], *, certificates_dir: str = "/etc/ai-system/health-probe",
                   client_key_name: str = "client", wait: int = 0) -> dict[str, dict]:
    """zmq_health run on each lab host over SSH (molecule/resources/probe.yml), all at once:
    {host: the module's result}. endpoints: {host: [endpoints]}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as extra:
        json.dump({"probe_hosts": ",".join(endpoints), "probe_endpoints": endpoints, "probe_wait": wait,
                   "probe_certificates_dir": certificates_dir, "probe_client_key_name": client_key_name}, extra)
    # The project's configuration (inventory, connection), but JSON output and no other callback.
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT_DIR / "ansible.cfg"), ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
               # Only the JSON stdout callback (an empty list is an error).
               ANSIBLE_CALLBACKS_ENABLED="ansible.builtin.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), str(PROJECT_DIR / "molecule" / "resources" / "probe.yml"),
           "-e", f"@{extra.name}"]
    try:
        result = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, text=True, capture_output=True, check=False)
    finally:
        os.unlink(extra.name)
    try:
        return json.loads(result.stdout)["plays"][0]["tasks"][0]["hosts"]
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"{' '.join(cmd)} gave no JSON (rc={result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def lab_host(name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"docker://{name}")


@pytest.fixture(scope="session")
def mainpc() -> testinfra.host.Host:
    return lab_host("ai-lab-mainpc")


@pytest.fixture(scope="session")
def pc2() -> testinfra.host.Host:
    return lab_host("ai-lab-pc2")


@pytest.fixture(scope="session", params=LAB_HOSTS)
def host(request: pytest.FixtureRequest) -> testinfra.host.Host:
    """Each lab host in turn."""
    return lab_host(request.param)


@pytest.fixture(scope="session")
def scenario_dir() -> Path:
    return Path(os.environ.get("MOLECULE_SCENARIO_DIRECTORY", PROJECT_DIR / "molecule" / "default"))


def run_playbook(playbook: Path | str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ansible-playbook from the project venv with the project's configuration."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT_DIR / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0")
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), str(playbook), *args]
    result = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, text=True, capture_output=True, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (rc={result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}")
    return result


def play_recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters per host: {'ai-lab-pc2': {'ok': 12, 'changed': 0, ...}}."""
    recap = output.rsplit("PLAY RECAP", 1)[-1]
    return {
        m["host"]: {k: int(v) for k, v in (kv.split("=") for kv in m["counts"].split())}
        for m in RECAP_LINE.finditer(recap)
    }


def assert_check_mode_predicts_no_change(playbook: Path, *args: str) -> None:
    """A check-mode run after converge must report nothing to change and no failure."""
    result = run_playbook(playbook, "--check", "--diff", *args)
    recap = play_recap(result.stdout)
    assert recap, result.stdout[-3000:]
    for name, counts in recap.items():
        assert counts["failed"] == 0 and counts["unreachable"] == 0, f"{name}: {counts}"
        assert counts["changed"] == 0, f"check mode predicts changes on {name}:\n{result.stdout[-5000:]}"


def run_module(module: str, args: dict, *, host: str = "localhost") -> dict:
    """Run one module with the project's configuration and return its JSON result."""
    import json

    # Not the project's ansible.cfg: its timing callbacks would interleave with the JSON.
    env = dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
               ANSIBLE_LIBRARY=str(PROJECT_DIR / "library"), ANSIBLE_MODULE_UTILS=str(PROJECT_DIR / "module_utils"))
    cmd = [str(Path(sys.executable).parent / "ansible"), host, "-i", f"{host},", "-c", "local",
           "-e", f"ansible_python_interpreter={sys.executable}", "-m", module, "-a", json.dumps(args)]
    env.pop("ANSIBLE_CONFIG", None)
    result = subprocess.run(cmd, cwd=PROJECT_DIR / "molecule", env=env, text=True, capture_output=True, check=False)
    try:
        plays = json.loads(result.stdout)["plays"]
    except (ValueError, KeyError):
        pytest.fail(f"{' '.join(cmd)} gave no JSON (rc={result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return plays[0]["tasks"][0]["hosts"][host]


def health(group_or_host: str = "ai_hosts", wait: int = 0) -> dict[str, str]:
    """{service: state} of every service of a host or group (default both machines), probed over
    CURVE on each host with the health probe's key, as the deploy's gate does; wait up to `wait`
    s for all healthy."""
    deadline = time.monotonic() + wait
    while True:
        left = max(0, int(deadline - time.monotonic()))
        results = probe_on_hosts({host: service_endpoints(host) for host in _hosts_of(group_or_host)}, wait=left)
        # A host that restarts refuses SSH for a while: within the wait, that is not an answer yet.
        if not left or not any(result.get("unreachable") for result in results.values()):
            break
        time.sleep(2)
    states = {}
    for host, result in results.items():
        if "endpoints" not in result:
            pytest.fail(f"the health probe failed on {host}: {result.get('msg', result)}")
        states.update({e["name"]: e["state"] for e in result["endpoints"]})
    return states


def all_healthy(group_or_host: str = "ai_hosts") -> dict[str, str]:
    """What health() returns when every service of the host or group is healthy."""
    return {name: "healthy" for name in catalogue(group_or_host)}


def containers(host: testinfra.host.Host, project: str) -> dict[str, str]:
    """{container name: 'id started-at'} of a Compose project on a lab host."""
    out = host.check_output(
        "docker ps -a --filter label=com.docker.compose.project=%s --format '{{.Names}}' "
        "| xargs -r docker inspect --format '{{.Name}} {{.Id}} {{.State.StartedAt}}'", project
    )
    return {line.split()[0].lstrip("/"): " ".join(line.split()[1:]) for line in out.splitlines()}


LAB_STATE = PROJECT_DIR / ".cache" / "lab"
REGISTRY = "ai-lab-registry:5000"


def registry_password() -> str:
    return (LAB_STATE / "registry" / "password").read_text().strip()


def lab_secrets() -> list[str]:
    """Every secret of the lab that must never appear in output, diffs or reports: the CURVE
    secret keys, the registry's password, the body of the lab's SSH private key."""
    ssh_key = (LAB_STATE / "ssh" / "id_ed25519").read_text().splitlines()
    ssh_body = [line for line in ssh_key if line and not line.startswith("-----")]
    assert secret_keys() and ssh_body
    return secret_keys() + [registry_password()] + ssh_body


def assert_no_secret(*outputs: str) -> None:
    for secret in lab_secrets():
        for output in outputs:
            assert secret not in output, "a secret of the lab appears in the output"


def secret_keys() -> list[str]:
    """The Z85 secret keys of the controller's key pairs (to prove they leak nowhere)."""
    found = []
    for path in (PROJECT_DIR / "certificates").glob("*.key_secret"):
        match = re.search(r'secret-key\s*=\s*"([^"]+)"', path.read_text())
        if match:
            found.append(match.group(1))
    return found
