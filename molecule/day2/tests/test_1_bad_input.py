"""Bad inventory input fails before any host changes, with a message naming the variable (or the hosts)."""

import json
import re

import pytest
import yaml
from conftest import LAB_INVENTORY, PROJECT_DIR, inventory_hostvars, play_recap, run_playbook

SDT = {"name": "system-digital-twin", "port": 7120}


def services(*extra, base=(SDT,)):
    return {"ai_stack_services": [*base, *extra]}


CASES = {
    "services not a list": ({"ai_stack_services": "system-digital-twin"}, "ai_stack_services"),
    "unknown machine type": ({"ai_machine_type": "LAPTOP"}, "ai_machine_type"),
    "port out of range": (services({"name": "a", "port": 70000}), "ai_stack_services[1] (a).port"),
    "port not a number": (services({"name": "a", "port": "fast"}), "ai_stack_services[1] (a).port"),
    "port used twice": (services({"name": "a", "port": 7120}), "port 7120 is already used by system-digital-twin.port"),
    "health port beyond 65535": (services({"name": "a", "port": 65000}), "(a).health_port"),
    "duplicate service": (services(SDT), "duplicate service name 'system-digital-twin'"),
    "missing dependency": (services({"name": "a", "port": 5000, "depends_on": ["b"]}), "(a).depends_on: no service named 'b'"),
    "dependency cycle": (services({"name": "a", "port": 5000, "depends_on": ["b"]},
                                  {"name": "b", "port": 5001, "depends_on": ["a"]}), "dependency cycle"),
    "unknown service key": (services({"name": "a", "port": 5000, "prot": 1}), "(a): unknown keys ['prot']"),
    "memory not a number": (services({"name": "a", "port": 5000, "memory_limit_mb": "lots"}), "(a).memory_limit_mb"),
    "bad JMESPath": (services({"name": "a", "port": 5000, "health_expect": "status =="}), "(a).health_expect: invalid JMESPath"),
    "missing image": ({"ai_stack_image": ""}, ".image: no image"),
    "unknown package source": ({"docker_package_source": "snap"}, "docker_package_source"),
    "encrypted not a bool": ({"swarm_network_encrypted": "maybe"}, "swarm_network_encrypted"),
    "unknown image source": ({"ai_stack_image_source": "ftp"}, "ai_stack_image_source"),
    "gpu_required not a bool": ({"nvidia_gpu_required": "sometimes"}, "nvidia_gpu_required"),
    "wait timeout not a number": ({"ai_stack_health_wait_timeout": "soon"}, "ai_stack_health_wait_timeout"),
}


@pytest.fixture(scope="module")
def compose_files(mainpc, pc2):
    return lambda: (mainpc.file("/opt/ai-system/mainpc/compose.yaml").sha256sum,
                    pc2.file("/opt/ai-system/pc2/compose.yaml").sha256sum)


@pytest.mark.parametrize("extra_vars,expected", CASES.values(), ids=CASES.keys())
def test_bad_input_fails_before_any_change(extra_vars, expected, compose_files):
    before = compose_files()
    result = run_playbook(PROJECT_DIR / "site.yml", "-e", json.dumps(extra_vars), check=False)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout[-3000:]
    recap = play_recap(result.stdout)
    assert recap and all(counts["changed"] == 0 for counts in recap.values()), recap
    assert compose_files() == before


def test_gpu_service_on_a_host_without_gpu():
    catalogue = [{"name": "advanced-router", "port": 5780, "gpu": True}]
    result = run_playbook(PROJECT_DIR / "site.yml", "--limit", "pc2", "-e", json.dumps({"ai_stack_services": catalogue}),
                          check=False)
    assert result.returncode != 0
    assert "(advanced-router).gpu: GPU service on a host outside the gpu_hosts group" in result.stdout
    assert all(counts["changed"] == 0 for counts in play_recap(result.stdout).values())


TWIN = "ai-lab-pc2-twin"
LOCK = "/var/lib/ai-system/deploy.lock"
AUDIT = "/var/log/ai-system/deployments.jsonl"


def locks_and_audit(*hosts):
    """Each host's deployment lock (None when there is none) and audit trail."""
    return [(h.file(LOCK).content_string if h.file(LOCK).exists else None,
             h.file(AUDIT).content_string if h.file(AUDIT).exists else None) for h in hosts]


def test_two_hosts_of_one_machine_type_fail_before_any_change(mainpc, pc2, compose_files, tmp_path):
    # A second inventory name for the PC2 container, in group pc2: two hosts of machine type PC2.
    real = inventory_hostvars("ai-lab-pc2")
    twin = {key: real[key] for key in ("ansible_host", "ansible_port", "ai_host_address")}
    overlay = tmp_path / "pc2-twin.yml"
    overlay.write_text(json.dumps({"all": {"children": {"ai_hosts": {"children": {"pc2": {"hosts": {TWIN: twin}}}},
                                                        "swarm_workers": {"hosts": {TWIN: {}}}}}}))
    facts = PROJECT_DIR / ".cache" / "facts"
    cached = set(facts.glob(f"*{TWIN}"))
    before = compose_files(), locks_and_audit(mainpc, pc2)
    try:
        result = run_playbook(PROJECT_DIR / "site.yml", "-i", str(LAB_INVENTORY), "-i", str(overlay), check=False)
    finally:
        for path in set(facts.glob(f"*{TWIN}")) - cached:  # the twin's facts, cached by this run
            path.unlink()
    assert result.returncode != 0
    assert re.search(rf"(ai-lab-pc2 and {TWIN}|{TWIN} and ai-lab-pc2) are all of machine type PC2", result.stdout), \
        result.stdout[-3000:]
    # Refused in the first play (the inventory check), on every host.
    first_play = yaml.safe_load((PROJECT_DIR / "site.yml").read_text())[0]["name"]
    assert re.findall(r"^PLAY \[(.*)\]", result.stdout, re.MULTILINE) == [first_play], result.stdout[-3000:]
    recap = play_recap(result.stdout)
    assert set(recap) == {"ai-lab-mainpc", "ai-lab-pc2", TWIN}, recap
    assert all(counts["changed"] == 0 for counts in recap.values()), recap
    # The run's locks (the twin's is pc2's own file) are released, no audit line written.
    assert (compose_files(), locks_and_audit(mainpc, pc2)) == before
