"""The CIS Docker Benchmark's checks that the deployment fixes, as docker-bench-security checks
them: the daemon defaults (2.2, 2.14, 2.16), CPU and PID limits (5.12, 5.29), published ports
(5.14) and healthchecks (5.27). The README lists the warnings that remain, with their reasons."""

import json

from conftest import host_address, inventory_hostvars, services

# The anchor image is built on every host; a container started by hand from it shows what the
# daemon gives containers that Compose did not make.
ANCHOR_IMAGE = "ai-system/network-anchor:2"


def inspect_all(host):
    ids = host.check_output("docker ps --all --quiet").split()
    return json.loads(host.check_output("docker inspect " + " ".join(ids)))  # hex ids


def test_daemon_json_holds_the_three_settings(host):
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert (daemon["icc"], daemon["no-new-privileges"], daemon["userland-proxy"]) == (False, True, False)


def test_the_running_engine_applies_them(host):
    # 2.2: no traffic between containers on the default bridge.
    bridge = json.loads(host.check_output("docker network inspect bridge"))[0]
    assert bridge["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    # 2.16: published ports are forwarded by iptables, no docker-proxy process.
    assert host.check_output("docker ps --format '{{.Ports}}'").count("->") > 0
    assert host.run("pgrep -x docker-proxy").rc == 1
    # 2.14: a container started by hand, without any security option, cannot gain privileges.
    status = host.check_output("docker run --rm --network none --entrypoint /bin/busybox %s grep NoNewPrivs /proc/self/status",
                               ANCHOR_IMAGE)
    assert status.split() == ["NoNewPrivs:", "1"]


def test_no_port_is_bound_to_every_interface_unless_the_catalogue_says_so(host):
    name = host.backend.name
    allowed = {"127.0.0.1", host_address(name)}
    published_by_catalogue = {str(s["publish"]) for s in services(name) if isinstance(s.get("publish"), str)}
    for container in inspect_all(host):
        for port, bindings in (container["HostConfig"].get("PortBindings") or {}).items():
            for binding in bindings or []:
                address = binding.get("HostIp") or "0.0.0.0"
                assert address in allowed | published_by_catalogue, (container["Name"], port, address)


def test_every_service_container_has_cpu_and_pid_limits(host):
    name = host.backend.name
    project = inventory_hostvars(name)["ai_machine_type"].lower()
    containers = inspect_all(host)
    assert {c["Name"].lstrip("/") for c in containers
            if c["Config"]["Labels"].get("com.docker.compose.project") == project} == {s["name"] for s in services(name)}
    for container in containers:
        config = container["HostConfig"]
        assert config.get("CpuShares") or config.get("NanoCpus"), container["Name"]
        assert (config.get("PidsLimit") or 0) > 0, container["Name"]


def test_every_container_has_a_healthcheck_and_is_healthy(host):
    for container in inspect_all(host):
        check = container["Config"].get("Healthcheck") or {}
        assert check.get("Test") and check["Test"][0] != "NONE", container["Name"]
        assert container["State"]["Health"]["Status"] in ("healthy", "starting"), container["Name"]
