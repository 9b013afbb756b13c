"""Every difference is applied and reported; engine restarts never take both hosts down."""

import json
import subprocess
import sys
import threading
import time

import pytest
import zmq
import zmq.auth
from conftest import PROJECT_DIR, containers, host_address, inventory_hosts, play_recap, run_playbook, services

SITE = PROJECT_DIR / "site.yml"
# {host: {its address: the main ports of the services it publishes}} (the entry points: the
# controller is outside the overlay), from the lab inventory.
SERVICES = {host: {host_address(host): [s["port"] for s in services(host) if s.get("publish")]}
            for host in inventory_hosts("ai_hosts")}


def overlay_inventory(tmp_path, **host_vars):
    """An extra inventory with host variables for single hosts, e.g. pc2={"x": 1}."""
    path = tmp_path / f"overlay-{len(list(tmp_path.glob('overlay-*')))}.yml"
    hosts = {f"ai-lab-{name}": values for name, values in host_vars.items()}
    # Under `all`, not `ai_hosts`: the groups keep the lab inventory's order (MainPC first).
    path.write_text(json.dumps({"all": {"hosts": hosts}}))
    return ["-i", "inventory/lab", "-i", str(path)]


def memory_mb(host, name):
    return int(host.check_output("docker inspect --format '{{.HostConfig.Memory}}' %s", name)) // 1024 ** 2


def drift_check(tmp_path, inventory=("-i", "inventory/lab")):
    result = subprocess.run([sys.executable, "scripts/drift-check", *inventory,
                             "--report", str(tmp_path / "drift")], cwd=PROJECT_DIR, text=True, capture_output=True,
                            check=False)
    report = (tmp_path / "drift" / "latest" / "drift-report.md").read_text()
    return result, report


def assert_converged(mainpc, pc2):
    before = containers(mainpc, "mainpc"), containers(pc2, "pc2")
    result = run_playbook(SITE)
    assert {h: c["changed"] for h, c in play_recap(result.stdout).items()} == {"ai-lab-mainpc": 0, "ai-lab-pc2": 0}
    assert (containers(mainpc, "mainpc"), containers(pc2, "pc2")) == before


@pytest.fixture
def back_to_the_inventory():
    yield
    run_playbook(SITE)


def test_a_change_staged_by_a_failed_run_is_applied_by_the_next(mainpc, pc2, tmp_path, back_to_the_inventory):
    # PC2 gets a new memory limit while MainPC fails its gate: the run stops after staging
    # PC2's files, before PC2's rollout.
    failed = run_playbook(SITE, *overlay_inventory(tmp_path, pc2={"ai_stack_memory_limit_mb": 2048},
                                                   mainpc={"ai_stack_image_tag": "lab-broken",
                                                           "ai_stack_health_wait_timeout": 20}), check=False)
    assert failed.returncode != 0 and "mainpc on ai-lab-mainpc failed its deploy" in failed.stdout
    assert "mem_limit: 2048m" in pc2.file("/opt/ai-system/pc2/compose.yaml").content_string
    assert memory_mb(pc2, "translator-agent") == 4096

    # MainPC repaired, PC2 still wants 2048m: the drift check reports what is staged but
    # not running, naming the service and the setting (it said "no drift" before).
    wanted = overlay_inventory(tmp_path, pc2={"ai_stack_memory_limit_mb": 2048})
    result, report = drift_check(tmp_path, wanted)
    assert result.returncode == 2, result.stdout + result.stderr
    finding = next((line for line in report.splitlines() if "translator-agent: differs from its configuration" in line), "")
    assert "memory: 4096m running, 2048m wanted" in finding and "environment: MAX_MEMORY_MB" in finding, report

    applied = run_playbook(SITE, *wanted)
    assert play_recap(applied.stdout)["ai-lab-pc2"]["changed"] > 0
    assert {memory_mb(pc2, name) for name in containers(pc2, "pc2")} == {2048}
    again = run_playbook(SITE, *wanted)
    assert {h: c["changed"] for h, c in play_recap(again.stdout).items()} == {"ai-lab-mainpc": 0, "ai-lab-pc2": 0}


def test_a_container_changed_by_hand_is_reported_and_recreated(mainpc, pc2, tmp_path, back_to_the_inventory):
    pc2.check_output("docker update --memory 1g --memory-swap 1g health-monitor")
    result, report = drift_check(tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "health-monitor: differs from its configuration: memory: 1024m running, 4096m wanted" in report
    assert memory_mb(pc2, "health-monitor") == 1024  # the check changed nothing

    fixed = run_playbook(SITE)
    # The deploy's Compose call for the services changed outside Compose, by name.
    assert "changed: [ai-lab-pc2] => (item=health-monitor)" in fixed.stdout
    assert memory_mb(pc2, "health-monitor") == 4096
    assert_converged(mainpc, pc2)


class Prober(threading.Thread):
    """Samples the published services (entry points) of both hosts over CURVE, every 0.3 s,
    from the controller.

    A host is down at a sample when none of them answers.
    """

    def __init__(self):
        super().__init__(daemon=True)
        certs = PROJECT_DIR / "certificates"
        self.public, self.secret = zmq.auth.load_certificate(certs / "health-probe.key_secret")
        self.server, _ = zmq.auth.load_certificate(certs / "server.key")
        self.samples = []  # (time, {host: services up})
        self.stop = threading.Event()

    def sample(self, ctx):
        poller, sockets = zmq.Poller(), {}
        for host, addresses in SERVICES.items():
            for address, ports in addresses.items():
                for port in ports:
                    sock = ctx.socket(zmq.REQ)
                    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.public, self.secret, self.server
                    sock.linger = 0
                    sock.connect(f"tcp://{address}:{port}")
                    sock.send_json({"action": "health_check"})
                    poller.register(sock, zmq.POLLIN)
                    sockets[sock] = host
        up = {host: 0 for host in SERVICES}
        deadline = time.monotonic() + 1.0
        while sockets and time.monotonic() < deadline:
            for sock, _ in poller.poll(100):
                up[sockets.pop(sock)] += 1
                poller.unregister(sock)
                sock.close()
        for sock in sockets:
            sock.close()
        return up

    def run(self):
        with zmq.Context() as ctx:
            while not self.stop.is_set():
                self.samples.append((time.monotonic(), self.sample(ctx)))
                time.sleep(0.3)


def engine_started_at(host):
    return host.check_output("systemctl show docker --property ActiveEnterTimestampMonotonic")


def test_an_engine_configuration_change_restarts_one_host_at_a_time(mainpc, pc2):
    before = [engine_started_at(h) for h in (mainpc, pc2)]
    # daemon.json keeps keys the inventory does not name: take a value it does not hold yet.
    current = json.loads(mainpc.file("/etc/docker/daemon.json").content_string).get("max-concurrent-downloads", 3)
    downloads = current % 5 + 1
    prober = Prober()
    prober.start()
    try:
        result = run_playbook(SITE, "-e", json.dumps({"docker_daemon_options": {"max-concurrent-downloads": downloads}}))
    finally:
        prober.stop.set()
        prober.join()
    # Both engines restarted, for the new daemon.json ...
    for host, started in zip((mainpc, pc2), before):
        assert json.loads(host.file("/etc/docker/daemon.json").content_string)["max-concurrent-downloads"] == downloads
        assert engine_started_at(host) != started
    samples = [up for _, up in prober.samples]
    assert len(samples) > 20
    # ... each went down at some point (the prober saw the restart) ...
    assert any(up["ai-lab-mainpc"] == 0 for up in samples) and any(up["ai-lab-pc2"] == 0 for up in samples)
    # ... and never both at once.
    assert not [up for up in samples if up["ai-lab-mainpc"] == 0 and up["ai-lab-pc2"] == 0]
    assert "Restart this host's engine for its changed configuration" in result.stdout
    # The next run: nothing to change, no restart, no container recreated.
    after = [engine_started_at(h) for h in (mainpc, pc2)]
    assert_converged(mainpc, pc2)
    assert [engine_started_at(h) for h in (mainpc, pc2)] == after


@pytest.fixture(autouse=True)
def all_healthy_after(mainpc, pc2):
    yield
    for host in (mainpc, pc2):
        assert host.run("docker ps --filter health=unhealthy -q").stdout.strip() == ""
