"""roles/ai_stack/filter_plugins: catalogue validation and the Compose project."""

import importlib.util
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ai_stack_filters", PROJECT / "roles/ai_stack/filter_plugins/ai_stack.py")
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)

CATALOGUES = {
    name: yaml.safe_load((PROJECT / f"inventory/production/group_vars/{name}/ai_stack.yml").read_text())
    for name in ("mainpc", "pc2")
}
SETTINGS = {
    "project": "mainpc", "image": "ai-system/mainpc:1", "env_file": "env.mainpc", "health_port_offset": 1000,
    "local_network": "mainpc-network", "shared_network": "ai-shared-network", "publish_address": "0.0.0.0",
    "user": "10001:10001", "read_only": True, "memory_limit_mb": 8192, "logging": {"driver": "json-file"},
    "healthcheck": {"test": ["CMD", "true"]}, "gpu_reservations": True, "certificates_dir": "/etc/c",
    "logs_dir": "/var/log/a", "certificates_digest": "abc",
}


def errors(services, machine="MAINPC", gpu=True, image="img"):
    return filters.ai_stack_errors(services, machine, gpu, image)


@pytest.mark.parametrize("machine", ["mainpc", "pc2"])
def test_the_seed_catalogues_are_valid(machine):
    catalogue = CATALOGUES[machine]
    assert errors(catalogue["ai_stack_services"], catalogue["ai_machine_type"], machine == "mainpc") == []


@pytest.mark.parametrize(("services", "expected"), [
    ([{"name": "a", "port": 1}, {"name": "a", "port": 2}], "duplicate service name 'a'"),
    ([{"name": "a", "port": 0}], "(a).port: must be an integer 1-65535"),
    ([{"name": "a", "port": True}], "(a).port: must be an integer 1-65535"),
    ([{"name": "a", "port": 1, "health_port": 99999}], "(a).health_port"),
    ([{"name": "a", "port": 1}, {"name": "b", "port": 1001}], "port 1001 is already used by a.health_port"),
    ([{"name": "a", "port": 1, "depends_on": ["a"]}], "cannot depend on itself"),
    ([{"name": "a", "port": 1, "depends_on": ["b"]}, {"name": "b", "port": 2, "depends_on": ["c"]},
      {"name": "c", "port": 3, "depends_on": ["a"]}], "dependency cycle a -> b -> c -> a"),
    ([{"name": "A_b", "port": 1}], "name must be lowercase"),
    ([{"name": "a", "port": 1, "gpu": "yes"}], "(a).gpu: must be true or false"),
    ([{"name": "a", "port": 1, "env": ["X=1"]}], "(a).env: must be a dict"),
    ([{"name": "a", "port": 1, "health_expect": "[?"}], "invalid JMESPath"),
    ("a", "must be a non-empty list"),
    ([], "must be a non-empty list"),
])
def test_bad_catalogues(services, expected):
    found = errors(services)
    assert any(expected in e for e in found), found


def test_gpu_service_outside_gpu_hosts():
    assert "GPU service on a host outside the gpu_hosts group" in " ".join(
        errors([{"name": "a", "port": 1, "gpu": True}], gpu=False))


def test_unknown_machine_type_and_missing_image():
    found = " ".join(errors([{"name": "a", "port": 1}], machine="LAPTOP", image=""))
    assert "ai_machine_type: 'LAPTOP'" in found and "(a).image: no image" in found


def test_compose_project_follows_the_seed():
    compose = filters.ai_stack_compose(CATALOGUES["mainpc"]["ai_stack_services"], SETTINGS)
    services = compose["services"]
    assert list(services) == ["system-digital-twin", "task-router", "streaming-interrupt-handler",
                              "streaming-tts-agent", "tts-agent", "responder"]
    assert services["responder"]["depends_on"] == {"streaming-tts-agent": {"condition": "service_healthy"},
                                                   "tts-agent": {"condition": "service_healthy"}}
    assert services["task-router"]["ports"] == ["0.0.0.0:8571:8571", "0.0.0.0:8572:8572", "127.0.0.1:9571:9571"]
    assert services["system-digital-twin"]["networks"] == ["mainpc-network", "ai-shared-network"]
    assert services["responder"]["networks"] == ["mainpc-network"]
    assert "deploy" in services["tts-agent"] and "deploy" not in services["responder"]
    assert services["tts-agent"]["cap_drop"] == ["ALL"] and services["tts-agent"]["read_only"] is True
    assert compose["networks"] == {"ai-shared-network": {"external": True}, "mainpc-network": {"external": True}}


def test_no_gpu_reservation_when_disabled():
    compose = filters.ai_stack_compose(CATALOGUES["mainpc"]["ai_stack_services"], {**SETTINGS, "gpu_reservations": False})
    assert not any("deploy" in s for s in compose["services"].values())


def test_runtime_drift():
    compose = filters.ai_stack_compose([{"name": "a", "port": 1}, {"name": "b", "port": 2}], SETTINGS)
    containers = [
        {"Names": ["/a"], "State": "exited", "Image": "other:1", "Labels": {"ai-system.certificates": "old"},
         "Status": "Exited (0)"},
        {"Names": ["/stray"], "State": "running", "Image": "x", "Labels": {}, "Status": "Up"},
    ]
    found = filters.ai_stack_runtime_drift(containers, compose)
    assert found == [
        "a: container exited (would be started)",
        "a: runs image other:1, expected ai-system/mainpc:1 (would be recreated)",
        "a: started with other CURVE keys (would be recreated)",
        "b: container missing (would be created)",
        "stray: container not in the Compose project (would be removed)",
    ]


def test_health_endpoints_from_the_catalogue_and_from_a_compose_file():
    services = [{"name": "a", "port": 7120}, {"name": "b", "port": 5000, "health_port": 5001, "health_expect": "ok"}]
    assert filters.ai_stack_health_endpoints(services) == [
        {"name": "a", "url": "tcp://127.0.0.1:8120"}, {"name": "b", "url": "tcp://127.0.0.1:5001", "expect": "ok"}]
    compose = filters.ai_stack_compose(services, SETTINGS)
    assert filters.ai_stack_compose_health_endpoints(compose) == [
        {"name": "a", "url": "tcp://127.0.0.1:8120"}, {"name": "b", "url": "tcp://127.0.0.1:5001"}]


def test_unhealthy_summary():
    health = {"endpoints": [{"name": "a", "state": "healthy", "healthy": True},
                            {"name": "b", "state": "auth_failed", "healthy": False}]}
    assert filters.ai_stack_unhealthy(health) == ["b: auth_failed"]


def test_health_table():
    rows = filters.ai_stack_health_table({"mainpc": {"endpoints": [
        {"name": "task-router", "state": "healthy", "latency_ms": 1.234},
        {"name": "responder", "state": "refused", "latency_ms": None}]}, "pc2": None})
    assert rows[0].split() == ["HOST", "SERVICE", "STATE", "LATENCY"]
    assert rows[1].split() == ["mainpc", "task-router", "healthy", "1.2", "ms"]
    assert rows[2].split() == ["mainpc", "responder", "refused", "-"]
    assert len(rows) == 3


@pytest.mark.parametrize(("error", "reason"), [
    ("Logging into ai-lab-registry:5000 for user ai-lab failed - 401 Client Error: Unauthorized", "refused the credentials"),
    ("Error: Get \"https://ai-lab-registry:5000/v2/\": tls: failed to verify certificate: x509: certificate signed by "
     "unknown authority", "TLS certificate is not trusted"),
    ("manifest for ai-lab-registry:5000/ai-system/agent:nope not found: manifest unknown", "does not have this image or tag"),
    ("Get \"https://ai-lab-registry:5000/v2/\": dial tcp: lookup ai-lab-registry on 127.0.0.11:53: no such host",
     "does not answer"),
    ("something new", "The pull failed"),
])
def test_pull_failures_are_explained(error, reason):
    assert reason in filters.ai_stack_pull_failure(error)


def test_pull_failure_masks_the_password():
    message = filters.ai_stack_pull_failure("login with s3cr3t-pw failed: 401 Unauthorized", "s3cr3t-pw")
    assert "s3cr3t-pw" not in message and "********" in message


def test_image_digests_from_inspect_data():
    images = [{"RepoTags": ["reg:5000/ai-system/agent:lab", "reg:5000/ai-system/agent:lab-next"],
               "RepoDigests": ["reg:5000/ai-system/agent@sha256:abc"]},
              {"RepoTags": ["ai-system/agent:lab"], "RepoDigests": []}]
    wanted = ["reg:5000/ai-system/agent:lab", "ai-system/agent:lab", "reg:5000/other:1"]
    assert filters.ai_stack_image_digests(images, wanted) == {
        "reg:5000/ai-system/agent:lab": "sha256:abc", "ai-system/agent:lab": "", "reg:5000/other:1": ""}
    table = filters.ai_stack_image_table({"ai-lab-pc2": {"reg:5000/ai-system/agent:lab": "sha256:abc"}})
    assert "sha256:abc" in table[1] and table[1].startswith("ai-lab-pc2")
