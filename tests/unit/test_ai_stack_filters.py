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
    "local_network": "mainpc-network", "shared_network": "ai-shared-network", "publish_address": "192.0.2.16",
    "user": "10001:10001", "read_only": True, "memory_limit_mb": 8192, "cpu_shares": 1024, "pids_limit": 512,
    "shm_size": "64m", "ulimits": {}, "gpu_shm_size": "2g", "gpu_ulimits": {"memlock": -1, "stack": 67108864}, "logging": {"driver": "json-file"},
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


def test_bad_machine_type_and_missing_image():
    found = " ".join(errors([{"name": "a", "port": 1}], machine="laptop-1", image=""))
    assert "ai_machine_type: 'laptop-1'" in found and "(a).image: no image" in found


def test_any_upper_case_machine_type_is_a_machine_type():
    assert errors([{"name": "a", "port": 1}], machine="PC3") == []


def _hostvars(**hosts):
    return {name: dict(ai_host_address=f"192.0.2.{i}", **spec) for i, (name, spec) in enumerate(hosts.items(), 1)}


def test_machines_tell_the_agents_where_each_machine_is():
    hostvars = _hostvars(
        main={"ai_machine_type": "MAINPC", "ai_machine_ip_env": "MAIN_PC_IP",
              "ai_stack_services": [{"name": "system-digital-twin", "port": 7120, "shared": True}]},
        pc2={"ai_machine_type": "PC2", "ai_stack_services": [{"name": "advanced-router", "port": 5780, "shared": True}]},
        pc3={"ai_machine_type": "PC3", "ai_machine_ip_env": "PC3_IP", "ai_stack_services": [{"name": "ocr", "port": 5800}]})
    machines = filters.ai_stack_machines(hostvars, ["main", "pc2", "pc3"])
    assert machines["errors"] == []
    # In inventory order; PC2 takes the default <TYPE>_IP.
    assert list(machines["ips"].items()) == [("MAIN_PC_IP", "192.0.2.1"), ("PC2_IP", "192.0.2.2"), ("PC3_IP", "192.0.2.3")]
    assert machines["service_hosts"] == {"system-digital-twin": "main", "advanced-router": "pc2", "ocr": "pc3"}


def test_two_hosts_of_one_machine_type_are_refused():
    router = [{"name": "advanced-router", "port": 5780, "shared": True}]
    hostvars = _hostvars(pc2={"ai_machine_type": "PC2", "ai_stack_services": router},
                         pc2b={"ai_machine_type": "PC2", "ai_stack_services": router})
    found = filters.ai_stack_machines(hostvars, ["pc2", "pc2b"])["errors"]
    assert len(found) == 1 and found[0].startswith("pc2 and pc2b are all of machine type PC2"), found


def test_a_shared_service_name_on_two_machines_is_refused():
    hostvars = _hostvars(a={"ai_machine_type": "A", "ai_stack_services": [{"name": "x", "port": 1, "shared": True}]},
                         b={"ai_machine_type": "B", "ai_stack_services": [{"name": "x", "port": 1, "shared": True}]})
    assert filters.ai_stack_machines(hostvars, ["a", "b"])["errors"] == [
        "service x of b is also a shared service of a: names on ai-shared-network must be unique, rename one of them"]


def test_a_machine_address_variable_named_twice_or_badly_is_refused():
    hostvars = _hostvars(a={"ai_machine_type": "A", "ai_machine_ip_env": "X_IP"},
                         b={"ai_machine_type": "B", "ai_machine_ip_env": "X_IP"},
                         c={"ai_machine_type": "C", "ai_machine_ip_env": "not a name"})
    found = filters.ai_stack_machines(hostvars, ["a", "b", "c"])["errors"]
    assert any("ai_machine_ip_env of b: X_IP already" in e for e in found)
    assert any("ai_machine_ip_env of c: 'not a name'" in e for e in found)


def test_compose_project_follows_the_seed():
    compose = filters.ai_stack_compose(CATALOGUES["mainpc"]["ai_stack_services"], SETTINGS)
    services = compose["services"]
    assert list(services) == ["system-digital-twin", "task-router", "streaming-interrupt-handler",
                              "streaming-tts-agent", "tts-agent", "responder"]
    assert services["responder"]["depends_on"] == {"streaming-tts-agent": {"condition": "service_healthy"},
                                                   "tts-agent": {"condition": "service_healthy"}}
    assert services["task-router"]["ports"] == ["192.0.2.16:8571:8571", "192.0.2.16:8572:8572", "127.0.0.1:9571:9571"]
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


def running_container(spec, name, env_file_vars=None, **changes):
    """What `docker inspect` shows for a container Compose created from `spec` (the fields
    the comparison reads), with `changes` applied."""
    ports = {}
    for entry in spec["ports"]:
        address, host_port, container_port = entry.rsplit(":", 2)
        ports.setdefault(f"{container_port}/tcp", []).append({"HostIp": address, "HostPort": host_port})
    check = spec["healthcheck"]
    info = {
        "Name": f"/{name}",
        "Config": {
            "Image": spec["image"], "User": spec["user"], "Hostname": name,
            "Env": ["PATH=/usr/bin", *(f"{k}={v}" for k, v in {**(env_file_vars or {}), **spec["environment"]}.items())],
            "Cmd": ["serve"], "Healthcheck": {"Test": check["test"]},
            "Labels": {**spec["labels"], "com.docker.compose.config-hash": "h1"},
        },
        "HostConfig": {
            "Memory": int(spec["mem_limit"].rstrip("m")) * 1024 * 1024, "PortBindings": ports,
            "SecurityOpt": spec["security_opt"], "ReadonlyRootfs": spec["read_only"], "CapDrop": spec["cap_drop"],
            "Tmpfs": {"/tmp": ""}, "LogConfig": {"Type": spec["logging"]["driver"], "Config": {}},
            "RestartPolicy": {"Name": spec["restart"]}, "DeviceRequests": None,
            "CpuShares": spec["cpu_shares"], "PidsLimit": spec["pids_limit"], "NanoCpus": int(spec.get("cpus", 0) * 1e9),
            "ShmSize": 64 * 1024 ** 2, "Ulimits": None,
        },
        "Mounts": [{"Type": "bind", "Source": v.split(":")[0], "Destination": v.split(":")[1],
                    "RW": not v.endswith(":ro")} for v in spec["volumes"]],
        "NetworkSettings": {"Networks": {n: {} for n in spec["networks"]}},
    }
    for path, value in changes.items():
        section, key = path.split("__")
        info[section][key] = value
    return info


def drift_setup(**changes):
    compose = filters.ai_stack_compose([{"name": "a", "port": 5000, "shared": True, "publish": True}], SETTINGS)
    spec = compose["services"]["a"]
    running = {"containers": [running_container(spec, "a", {"MAX_MEMORY_MB": "8192"}, **changes)]}
    return compose, running


def test_a_container_as_compose_made_it_has_no_drift():
    compose, running = drift_setup()
    assert filters.ai_stack_config_drift(running, compose, "# comment\nMAX_MEMORY_MB=8192\n") == {}
    assert filters.ai_stack_changed_outside_compose(running, compose, "MAX_MEMORY_MB=8192") == []


def test_memory_changed_by_docker_update_is_drift_compose_would_not_fix():
    compose, running = drift_setup(HostConfig__Memory=2048 * 1024 * 1024)
    assert filters.ai_stack_config_drift(running, compose, "MAX_MEMORY_MB=8192") == {
        "a": ["memory: 2048m running, 8192m wanted"]}
    # Compose's hash still matches: the deploy must recreate it itself.
    assert filters.ai_stack_changed_outside_compose(running, compose, "MAX_MEMORY_MB=8192") == ["a"]


def test_a_container_from_another_configuration_is_left_to_compose():
    compose, running = drift_setup()
    running["containers"][0]["Config"]["Labels"]["ai-system.config-digest"] = "0123456789abcdef"
    assert filters.ai_stack_config_drift(running, compose, "MAX_MEMORY_MB=8192") == {
        "a": ["created from another configuration"]}
    assert filters.ai_stack_changed_outside_compose(running, compose, "MAX_MEMORY_MB=8192") == []


def test_environment_differences_name_keys_never_values():
    compose, running = drift_setup()
    found = filters.ai_stack_config_drift(running, compose, "MAX_MEMORY_MB=4096\nAPI_TOKEN=s3cr3t\n")["a"]
    assert found == ["environment: API_TOKEN, MAX_MEMORY_MB"]
    assert "s3cr3t" not in str(found) and "4096" not in str(found)


@pytest.mark.parametrize(("change", "expected"), [
    ({"Config__Image": "ai-system/mainpc:0"}, "image: ai-system/mainpc:0 running, ai-system/mainpc:1 wanted"),
    ({"HostConfig__PortBindings": {"5000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "5000"}]}}, "ports: "),
    ({"Mounts": []}, "volumes"),
    ({"Config__Cmd": ["serve", "--debug"]}, None),
    ({"Config__Healthcheck": {"Test": ["CMD", "false"]}}, "healthcheck"),
    ({"Config__User": ""}, "user: image default running, 10001:10001 wanted"),
    ({"HostConfig__SecurityOpt": []}, "security options"),
    ({"HostConfig__ReadonlyRootfs": False}, "read-only root filesystem"),
    ({"HostConfig__CapDrop": None}, "dropped capabilities"),
    ({"NetworkSettings__Networks": {"mainpc-network": {}}}, "networks: mainpc-network running, "),
    ({"HostConfig__LogConfig": {"Type": "local", "Config": {}}}, "logging"),
    ({"HostConfig__RestartPolicy": {"Name": "no"}}, "restart policy"),
    ({"HostConfig__DeviceRequests": [{"Driver": "nvidia"}]}, "GPU reservation"),
    ({"HostConfig__CpuShares": 0}, "CPU shares: none running, 1024 wanted"),
    ({"HostConfig__PidsLimit": None}, "PID limit: none running, 512 wanted"),
    ({"HostConfig__NanoCpus": 500000000}, "CPUs: 0.5 running, 0 wanted"),
    ({"HostConfig__ShmSize": 2 * 1024 ** 3}, "shm size: 2048m running, 64m wanted"),
    ({"HostConfig__Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 1024}]}, "ulimits"),
])
def test_every_rendered_setting_is_compared(change, expected):
    if "Mounts" in change:
        compose, running = drift_setup()
        running["containers"][0]["Mounts"] = []
    else:
        compose, running = drift_setup(**change)
    found = filters.ai_stack_config_drift(running, compose, "MAX_MEMORY_MB=8192").get("a", [])
    if expected is None:  # no command in the catalogue: the image's own is not drift
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(expected), found


def test_a_command_in_the_catalogue_is_compared():
    compose = filters.ai_stack_compose([{"name": "a", "port": 5000, "command": ["serve", "--fast"]}], SETTINGS)
    spec = compose["services"]["a"]
    running = {"containers": [running_container(spec, "a")]}
    assert filters.ai_stack_config_drift(running, compose) == {"a": ["command"]}


def test_the_config_digest_changes_with_the_service_and_the_env_file():
    one = filters.ai_stack_compose([{"name": "a", "port": 5000}], SETTINGS)["services"]["a"]["labels"]
    other_port = filters.ai_stack_compose([{"name": "a", "port": 5001}], SETTINGS)["services"]["a"]["labels"]
    other_env = filters.ai_stack_compose([{"name": "a", "port": 5000}], {**SETTINGS, "env_digest": "x"})["services"]["a"]["labels"]
    digests = {labels["ai-system.config-digest"] for labels in (one, other_port, other_env)}
    assert len(digests) == 3 and all(len(d) == 16 for d in digests)


def test_running_config_parses_inspect():
    assert filters.ai_stack_running_config('[{"Name": "/a"}]\n') == {"containers": [{"Name": "/a"}]}
    assert filters.ai_stack_running_config("") == {"containers": []}
    assert filters.ai_stack_running_config("not json") == {"containers": []}


def test_runtime_drift_reports_configuration_differences():
    compose, running = drift_setup(HostConfig__Memory=2048 * 1024 * 1024)
    containers = [{"Names": ["/a"], "State": "running", "Image": "ai-system/mainpc:1",
                   "Labels": {"ai-system.certificates": "abc"}, "Status": "Up (healthy)"}]
    assert filters.ai_stack_runtime_drift(containers, compose, running, "MAX_MEMORY_MB=8192") == [
        "a: differs from its configuration: memory: 2048m running, 8192m wanted (would be recreated)"]


def test_services_that_register_on_another_machine_must_be_shared():
    services = [{"name": "a", "port": 1, "shared": True}, {"name": "b", "port": 2}]
    assert filters.ai_stack_errors(services, "PC3", False, "img") == []
    found = filters.ai_stack_errors(services, "PC3", False, "img", remote_registry="system-digital-twin")
    assert found == ["ai_stack_services[1] (b): not shared, but this machine's agents register with system-digital-twin "
                     "on another machine (ai_stack_force_local_sdt is false), over the shared network: set shared: true"]


def _compose(*services, **settings):
    return filters.ai_stack_compose(list(services), {**SETTINGS, **settings})["services"]


def test_main_ports_are_published_only_when_the_catalogue_asks():
    services = _compose({"name": "hidden", "port": 5000}, {"name": "entry", "port": 5001, "extra_ports": [5002], "publish": True},
                        {"name": "everywhere", "port": 5003, "publish": "0.0.0.0"}, {"name": "v6", "port": 5004, "publish": "fd00::1"})
    assert services["hidden"]["ports"] == ["127.0.0.1:6000:6000"]
    assert services["entry"]["ports"] == ["192.0.2.16:5001:5001", "192.0.2.16:5002:5002", "127.0.0.1:6001:6001"]
    assert services["everywhere"]["ports"] == ["0.0.0.0:5003:5003", "127.0.0.1:6003:6003"]
    assert services["v6"]["ports"] == ["[fd00::1]:5004:5004", "127.0.0.1:6004:6004"]


def test_the_production_catalogues_publish_nothing_on_every_interface():
    for machine, catalogue in CATALOGUES.items():
        for name, spec in _compose(*catalogue["ai_stack_services"]).items():
            published = [p for p in spec["ports"] if not p.startswith("127.0.0.1:")]
            assert all(p.startswith("192.0.2.16:") for p in published), (machine, name, published)
    entry_points = {s["name"] for c in CATALOGUES.values() for s in c["ai_stack_services"] if s.get("publish")}
    assert entry_points == {"task-router", "advanced-router"}


def test_every_container_has_cpu_shares_and_a_pid_limit_gpu_services_more_weight():
    services = _compose(*CATALOGUES["mainpc"]["ai_stack_services"])
    assert all(s["pids_limit"] == 512 for s in services.values())
    assert {n: s["cpu_shares"] for n, s in services.items() if s["cpu_shares"] != 1024} == {
        "streaming-tts-agent": 2048, "tts-agent": 2048}
    capped = _compose({"name": "a", "port": 1, "cpus": 1.5, "pids_limit": 64, "cpu_shares": 512})["a"]
    assert (capped["cpus"], capped["pids_limit"], capped["cpu_shares"]) == (1.5, 64, 512)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("publish", "everywhere", "publish: must be true (on the host's address), false, or an IP address"),
    ("publish", 1, "publish: must be true"),
    ("cpus", 0, "cpus: must be a number of CPUs from 0.01"),
    ("cpus", "2", "cpus: must be a number of CPUs from 0.01"),
    ("cpu_shares", 1, "cpu_shares: must be an integer 2-262144"),
    ("pids_limit", 8, "pids_limit: must be an integer >= 16"),
    ("pids_limit", True, "pids_limit: must be an integer >= 16"),
])
def test_publishing_and_limits_are_validated(key, value, message):
    found = errors([{"name": "a", "port": 1, key: value}])
    assert len(found) == 1 and f"ai_stack_services[0] (a).{message}" in found[0], found


def test_gpu_services_get_a_larger_shm_and_their_ulimits_by_default():
    services = _compose(*CATALOGUES["mainpc"]["ai_stack_services"])
    gpu = {n for n, s in services.items() if s["shm_size"] == "2g"}
    assert gpu == {"streaming-tts-agent", "tts-agent"}
    assert services["tts-agent"]["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert services["task-router"]["shm_size"] == "64m" and "ulimits" not in services["task-router"]
    own = _compose({"name": "a", "port": 1, "gpu": True, "shm_size": "4g", "ulimits": {"nofile": {"soft": 1024, "hard": 4096}}})["a"]
    assert (own["shm_size"], own["ulimits"]) == ("4g", {"nofile": {"soft": 1024, "hard": 4096}})


def test_running_ulimits_and_shm_are_compared():
    compose = filters.ai_stack_compose([{"name": "a", "port": 5000, "gpu": True}], SETTINGS)
    spec = compose["services"]["a"]
    running = {"containers": [running_container(spec, "a", {"MAX_MEMORY_MB": "8192"},
                                                HostConfig__ShmSize=2 * 1024 ** 3, HostConfig__DeviceRequests=[{"Driver": "nvidia"}],
                                                HostConfig__Ulimits=[{"Name": "memlock", "Soft": -1, "Hard": -1},
                                                                     {"Name": "stack", "Soft": 67108864, "Hard": 67108864}])]}
    assert filters.ai_stack_config_drift(running, compose, "MAX_MEMORY_MB=8192") == {}
    running["containers"][0]["HostConfig"]["Ulimits"] = [{"Name": "stack", "Soft": 67108864, "Hard": 67108864}]
    assert filters.ai_stack_config_drift(running, compose, "MAX_MEMORY_MB=8192") == {"a": ["ulimits"]}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("shm_size", "2 GB", "shm_size: must be a size such as 64m or 2g"),
    ("shm_size", 64, "shm_size: must be a size such as 64m or 2g"),
    ("ulimits", {"rtprio": 1}, "ulimits: unknown limit 'rtprio'"),
    ("ulimits", {"memlock": {"soft": 2, "hard": 1}}, "ulimits.memlock: must be an integer"),
    ("ulimits", {"stack": "64m"}, "ulimits.stack: must be an integer"),
    ("ulimits", [], "ulimits: must be a dict of limits"),
])
def test_shm_and_ulimits_are_validated(key, value, message):
    found = errors([{"name": "a", "port": 1, key: value}])
    assert len(found) == 1 and f"ai_stack_services[0] (a).{message}" in found[0], found


def test_gpu_services_request_cdi_devices_in_cdi_mode():
    legacy = _compose({"name": "tts", "port": 1, "gpu": True})["tts"]
    cdi = _compose({"name": "tts", "port": 1, "gpu": True}, gpu_mode="cdi")["tts"]
    assert legacy["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia" and "devices" not in legacy
    assert cdi["devices"] == ["nvidia.com/gpu=all"] and "deploy" not in cdi
    compose = filters.ai_stack_compose([{"name": "tts", "port": 1, "gpu": True}], {**SETTINGS, "gpu_mode": "cdi"})
    running = {"containers": [running_container(compose["services"]["tts"], "tts", {"MAX_MEMORY_MB": "8192"},
                                                HostConfig__DeviceRequests=[{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=all"]}],
                                                HostConfig__ShmSize=2 * 1024 ** 3,
                                                HostConfig__Ulimits=[{"Name": "memlock", "Soft": -1, "Hard": -1},
                                                                     {"Name": "stack", "Soft": 67108864, "Hard": 67108864}])]}
    assert filters.ai_stack_config_drift(running, compose, "MAX_MEMORY_MB=8192") == {}


def test_a_gpu_service_without_its_gpu_is_unhealthy():
    health = {"endpoints": [{"name": "tts-agent", "state": "healthy", "healthy": True},
                            {"name": "responder", "state": "healthy", "healthy": True}],
              "healthy_count": 2, "unhealthy_count": 0}
    assert filters.ai_stack_gpu_lost(health, []) is health
    marked = filters.ai_stack_gpu_lost(health, ["tts-agent"])
    assert [e["state"] for e in marked["endpoints"]] == ["gpu_lost", "healthy"]
    assert (marked["healthy_count"], marked["unhealthy_count"]) == (1, 1)
    assert filters.ai_stack_unhealthy(marked) == ["tts-agent: gpu_lost"]
