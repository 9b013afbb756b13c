"""Tests for images/ai-agent/agent.py: the real script, run as subprocesses on 127.0.0.1.

Every test uses ephemeral loopback ports and (except the plain-mode test) real CURVE keys made
with zmq.auth.create_certificates. Waiting is done by polling with deadlines, never by fixed
sleeps, so the module stays well under 30 s on a 2-core machine.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

AGENT = Path(__file__).resolve().parents[2] / "images" / "ai-agent" / "agent.py"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0


# --------------------------------------------------------------------------- helpers

def free_ports(count):
    """Distinct ports the kernel considers free right now (all held open while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def secret_z85(path):
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("secret-key"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError(f"no secret-key in {path}")


def zmq_request(port, payload, keys=None, timeout=2.0, host=HOST):
    """One request on a fresh REQ socket. keys = (client_public, client_secret, server_public).
    Returns the reply bytes, or None on timeout."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        if keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
        sock.connect(f"tcp://{host}:{port}")
        sock.send(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        if sock.poll(int(timeout * 1000), zmq.POLLIN):
            return sock.recv()
        return None
    finally:
        sock.close(linger=0)


def zmq_json(port, payload, keys=None, timeout=2.0):
    raw = zmq_request(port, payload, keys, timeout)
    assert raw is not None, f"no reply from port {port} to {payload!r}"
    return json.loads(raw)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A certificates directory as mounted in production, plus a rogue key pair elsewhere."""
    base = tmp_path_factory.mktemp("curve")
    cert_dir = base / "certificates"
    rogue_dir = base / "rogue"
    cert_dir.mkdir()
    rogue_dir.mkdir()
    zmq.auth.create_certificates(str(cert_dir), "server")
    zmq.auth.create_certificates(str(cert_dir), "client")
    zmq.auth.create_certificates(str(rogue_dir), "rogue")

    def keypair(path):
        return zmq.auth.load_certificate(str(path))

    server_pub, _ = keypair(cert_dir / "server.key")
    client_pub, client_sec = keypair(cert_dir / "client.key_secret")
    rogue_pub, rogue_sec = keypair(rogue_dir / "rogue.key_secret")

    class Certs:
        dir = cert_dir
        rogue_secret_file = rogue_dir / "rogue.key_secret"
        client = (client_pub, client_sec, server_pub)
        rogue = (rogue_pub, rogue_sec, server_pub)
        secrets = [secret_z85(cert_dir / "server.key_secret"),
                   secret_z85(cert_dir / "client.key_secret"),
                   secret_z85(rogue_dir / "rogue.key_secret")]

    return Certs


class Agent:
    def __init__(self, proc, env, out_path, err_path):
        self.proc = proc
        self.env = env
        self.out_path = out_path
        self.err_path = err_path
        self.port = int(env["AGENT_PORT"]) if "AGENT_PORT" in env else None
        self.health_port = int(env["HEALTH_PORT"]) if "HEALTH_PORT" in env else None

    def output(self):
        return self.out_path.read_text() + self.err_path.read_text()

    def stop(self, timeout=3.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def base_env(certs):
    """A clean environment (nothing inherited that could change the agent's behaviour)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "BIND_ADDRESS": HOST,
        "MACHINE_TYPE": "MAINPC",
        "SECURE_ZMQ": "1",
        "ZMQ_CERTIFICATES_DIR": str(certs.dir),
        "ZMQ_REQUEST_TIMEOUT": "1000",
        # Env of the original system's env files that the agent must tolerate.
        "MAIN_PC_IP": "192.0.2.16",
        "PC2_IP": "192.0.2.17",
        "CONNECTION_RETRIES": "3",
        "SERVICE_DISCOVERY_TIMEOUT": "10000",
        "FORCE_LOCAL_SDT": "1",
        "MAX_MEMORY_MB": "8192",
        "MAX_VRAM_MB": "8192",
    }


@pytest.fixture
def run_cli(base_env):
    """Run agent.py with a subcommand to completion: returns CompletedProcess."""

    def run(*args, env=None, timeout=15):
        full_env = dict(base_env)
        full_env.update(env or {})
        return subprocess.run([sys.executable, str(AGENT), *args], env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def spawn(base_env, tmp_path, certs):
    """Start agent.py serve processes; all are stopped at teardown and their output is
    checked for secret key material."""
    started = []

    def start(name, port=None, health_port=None, wait_ready=True, **env):
        if port is None:
            port, health_port = free_ports(2)
        full_env = dict(base_env)
        full_env.update({"AGENT_NAME": name, "AGENT_PORT": str(port)})
        if health_port is not None:
            full_env["HEALTH_PORT"] = str(health_port)
        full_env.update({k: str(v) for k, v in env.items()})
        idx = len(started)
        out_path = tmp_path / f"{idx}-{name}.out"
        err_path = tmp_path / f"{idx}-{name}.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, str(AGENT), "serve"], env=full_env,
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        agent = Agent(proc, full_env, out_path, err_path)
        started.append(agent)
        if wait_ready:
            keys = certs.client if full_env.get("SECURE_ZMQ") == "1" else None

            def answers():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n"
                                         f"{agent.output()}")
                return zmq_request(agent.health_port, {"action": "health_check"}, keys, 0.5)

            wait_for(answers, START_TIMEOUT, f"{name} health port")
        return agent

    yield start

    for agent in started:
        agent.stop()
    for agent in started:
        text = agent.output()
        for secret in certs.secrets:
            assert secret not in text, "secret key material in agent output"


# --------------------------------------------------------------------------- tests

HEALTH_FIELDS = {"status", "ready", "initialized", "message", "timestamp", "uptime",
                 "health_status", "service", "machine"}


def test_registry_is_healthy_and_answers_protocol(spawn, certs):
    sdt = spawn("system-digital-twin", AGENT_ADVERTISE_HOST="sdt.example")
    health = zmq_json(sdt.health_port, {"action": "health_check"}, certs.client)
    assert HEALTH_FIELDS <= set(health)
    assert health["status"] == "ok"
    assert health["health_status"] == "healthy"
    assert health["ready"] is True and health["initialized"] is True
    assert health["service"] == "system-digital-twin"
    assert health["machine"] == "MAINPC"

    # Non-JSON on the health port is a health check; the main port answers the same actions.
    assert json.loads(zmq_request(sdt.health_port, b"are you there", certs.client))["status"] \
        == "ok"
    for action in ("ping", "health", "health_check"):
        assert zmq_json(sdt.port, {"action": action}, certs.client)["status"] == "ok"
    assert zmq_request(sdt.port, b"ping", certs.client) == b"pong"

    # Bad input never crashes it.
    for bad in (b"\xff\xfe", b"[1, 2]", b"{\"command\": \"REGISTER\", \"payload\": 3}",
                b"{\"action\": \"register_agent\", \"name\": \"x\", \"port\": \"nope\"}",
                b"{\"command\": \"REGISTER\", \"payload\": {\"name\": \"x\", \"port\": 70000}}",
                b"{\"action\": \"no_such_action\"}", b"null", b""):
        reply = json.loads(zmq_request(sdt.port, bad, certs.client))
        assert reply["status"] == "error", (bad, reply)
        assert reply.get("message")

    # The registry lists itself, and both protocol forms work.
    assert zmq_json(sdt.port, {"command": "REGISTER", "payload": {
        "name": "translator-agent", "location": "PC2", "ip": "192.0.2.17", "port": 5789}},
        certs.client) == {"status": "SUCCESS"}
    found = zmq_json(sdt.port, {"command": "DISCOVER", "payload": {"name": "translator-agent"}},
                     certs.client)
    assert found["status"] == "SUCCESS"
    assert found["payload"]["ip"] == "192.0.2.17" and found["payload"]["port"] == 5789
    assert zmq_json(sdt.port, {"command": "DISCOVER", "payload": {"name": "nobody"}},
                    certs.client)["status"] == "NOT_FOUND"
    agents = zmq_json(sdt.port, {"action": "list_agents"}, certs.client)
    assert agents["status"] == "ok"
    by_name = {a["name"]: a for a in agents["agents"]}
    assert by_name["system-digital-twin"]["port"] == sdt.port
    assert by_name["system-digital-twin"]["host"] == "sdt.example"
    assert by_name["translator-agent"]["location"] == "PC2"
    assert zmq_json(sdt.port, {"action": "get_agent_endpoint", "agent_name": "nobody"},
                    certs.client)["status"] == "error"
    assert zmq_json(sdt.health_port, {"action": "health_check"}, certs.client)["status"] == "ok"


def test_agent_degraded_until_registry_appears(spawn, run_cli, certs):
    sdt_port, sdt_health, agent_port, agent_health = free_ports(4)
    agent = spawn("task-router", agent_port, agent_health, MACHINE_TYPE="MAINPC",
                  SERVICE_DISCOVERY_ENABLED=1, SYSTEM_DIGITAL_TWIN_HOST=HOST,
                  SYSTEM_DIGITAL_TWIN_PORT=sdt_port, AGENT_ADVERTISE_HOST="task-router.lab")
    health = zmq_json(agent.health_port, {"action": "health_check"}, certs.client)
    assert health["status"] == "degraded"
    assert health["health_status"] == "degraded"
    assert health["ready"] is False
    assert f"not registered with system-digital-twin at {HOST}:{sdt_port}" in health["message"]
    hc = run_cli("healthcheck", "--port", str(agent_health))
    assert hc.returncode == 1, hc
    assert "degraded" in hc.stdout

    sdt = spawn("system-digital-twin", sdt_port, sdt_health, AGENT_ADVERTISE_HOST=HOST)

    def agent_ok():
        return zmq_json(agent.health_port, {"action": "health_check"}, certs.client)["status"] \
            == "ok"

    wait_for(agent_ok, 10, "task-router to register")
    hc = run_cli("healthcheck", env={"AGENT_PORT": str(agent_port),
                                     "HEALTH_PORT": str(agent_health)})
    assert hc.returncode == 0, hc

    # Visible through list_agents (via the query CLI, as the cross-host tests use it) ...
    q = run_cli("query", "--host", HOST, "--port", str(sdt.port), "--json",
                '{"action": "list_agents"}')
    assert q.returncode == 0, q
    listed = {a["name"]: a for a in json.loads(q.stdout)["agents"]}
    record = listed["task-router"]
    assert record["host"] == record["ip"] == "task-router.lab"
    assert record["port"] == agent_port and record["health_port"] == agent_health
    assert record["location"] == "MAINPC" and record["registered_at"]
    # ... through legacy DISCOVER and the newer get_agent_endpoint.
    found = zmq_json(sdt.port, {"command": "DISCOVER", "payload": {"name": "task-router"}},
                     certs.client)
    assert found["status"] == "SUCCESS" and found["payload"]["port"] == agent_port
    endpoint = zmq_json(sdt.port, {"action": "get_agent_endpoint", "agent_name": "task-router"},
                        certs.client)
    assert endpoint["status"] == "ok"
    assert endpoint["endpoint"] == f"tcp://task-router.lab:{agent_port}"

    # An ordinary agent is not a registry and says so.
    reply = zmq_json(agent.port, {"action": "list_agents"}, certs.client)
    assert reply["status"] == "error" and "not the registry" in reply["message"]


def test_unauthorised_client_key_gets_no_reply(spawn, run_cli, certs):
    sdt = spawn("system-digital-twin")
    assert zmq_request(sdt.health_port, {"action": "health_check"}, certs.rogue, 1.0) is None
    assert zmq_request(sdt.port, b"ping", certs.rogue, 0.5) is None
    # A client that does not speak CURVE at all gets nothing either.
    assert zmq_request(sdt.port, b"ping", None, 0.5) is None
    # The authorised key still works afterwards.
    assert zmq_request(sdt.port, b"ping", certs.client, 2.0) == b"pong"
    q = run_cli("query", "--host", HOST, "--port", str(sdt.port), "--raw", "ping",
                "--timeout", "0.5", "--client-secret", str(certs.rogue_secret_file))
    assert q.returncode != 0 and q.stdout == ""
    assert "no reply" in q.stderr


def test_healthcheck_exit_codes(spawn, run_cli):
    broken = spawn("tts-agent", AGENT_FORCE_UNHEALTHY=1)
    hc = run_cli("healthcheck", env={"AGENT_PORT": str(broken.port),
                                     "HEALTH_PORT": str(broken.health_port)})
    assert hc.returncode == 1, hc
    assert "'error'" in hc.stdout and "AGENT_FORCE_UNHEALTHY" in hc.stdout

    healthy = spawn("responder")  # discovery off: ok as soon as it is bound
    hc = run_cli("healthcheck", "--port", str(healthy.health_port))
    assert hc.returncode == 0, hc
    assert hc.stdout.startswith("healthy")

    (nothing,) = free_ports(1)
    started = time.monotonic()
    hc = run_cli("healthcheck", "--port", str(nothing), "--timeout", "0.5")
    assert hc.returncode == 1, hc  # never 2: Docker reserves that code
    assert "no reply" in hc.stdout
    assert time.monotonic() - started < 5


def test_plain_mode_without_curve(spawn, run_cli, tmp_path):
    env = {"SECURE_ZMQ": "0", "ZMQ_CERTIFICATES_DIR": str(tmp_path / "does-not-exist")}
    sdt_port, sdt_health = free_ports(2)
    sdt = spawn("system-digital-twin", sdt_port, sdt_health, **env)
    agent = spawn("advanced-router", MACHINE_TYPE="PC2", SERVICE_DISCOVERY_ENABLED=1,
                  SYSTEM_DIGITAL_TWIN_HOST=HOST, SYSTEM_DIGITAL_TWIN_PORT=sdt_port, **env)
    assert zmq_request(agent.port, b"ping") == b"pong"
    wait_for(lambda: zmq_json(agent.health_port, b"x")["status"] == "ok", 10,
             "advanced-router to register")
    found = zmq_json(sdt.port, {"command": "DISCOVER", "payload": {"name": "advanced-router"}})
    assert found["payload"]["location"] == "PC2"
    hc = run_cli("healthcheck", "--port", str(agent.health_port), env=env)
    assert hc.returncode == 0, hc


def test_sigterm_exits_quickly(spawn):
    # Worst case: the registration thread is waiting on a registry that never answers.
    (nowhere,) = free_ports(1)
    agent = spawn("streaming-tts-agent", SERVICE_DISCOVERY_ENABLED=1, ZMQ_REQUEST_TIMEOUT=5000,
                  SYSTEM_DIGITAL_TWIN_HOST=HOST, SYSTEM_DIGITAL_TWIN_PORT=nowhere)
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    code = agent.proc.wait(5)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 1.0, f"took {elapsed:.2f} s to stop"
    assert "received SIGTERM" in agent.output()


def test_missing_certificates_exit_2(spawn, tmp_path, certs):
    empty = tmp_path / "empty-certs"
    empty.mkdir()
    for cert_dir, expected in ((empty, "server.key_secret"),
                               (tmp_path / "absent", "is missing")):
        agent = spawn("task-router", wait_ready=False, ZMQ_CERTIFICATES_DIR=cert_dir)
        assert agent.proc.wait(10) == 2
        out = agent.output()
        assert "refusing to start" in out and expected in out, out

    # An agent that registers also needs the client key pair.
    server_only = tmp_path / "server-only"
    server_only.mkdir()
    for name in ("server.key", "server.key_secret"):
        (server_only / name).write_bytes((certs.dir / name).read_bytes())
    agent = spawn("task-router", wait_ready=False, ZMQ_CERTIFICATES_DIR=server_only,
                  SERVICE_DISCOVERY_ENABLED=1)
    assert agent.proc.wait(10) == 2
    assert "client.key_secret" in agent.output()


def test_logs_contain_no_secret_key_material(spawn, run_cli, certs):
    sdt_port, sdt_health = free_ports(2)
    sdt = spawn("system-digital-twin", sdt_port, sdt_health, LOG_LEVEL="DEBUG")
    agent = spawn("context-monitor", LOG_LEVEL="DEBUG", SERVICE_DISCOVERY_ENABLED=1,
                  SYSTEM_DIGITAL_TWIN_HOST=HOST, SYSTEM_DIGITAL_TWIN_PORT=sdt_port)
    wait_for(lambda: zmq_json(agent.health_port, {"action": "health_check"},
                              certs.client)["status"] == "ok", 10, "registration")
    zmq_request(sdt.port, b"ping", certs.rogue, 0.3)  # a denied handshake gets logged too
    results = [run_cli("healthcheck", "--port", str(agent.health_port), env={"LOG_LEVEL": "DEBUG"}),
               run_cli("query", "--host", HOST, "--port", str(sdt.port), "--json",
                       '{"action": "list_agents"}')]
    for proc in (sdt, agent):
        proc.stop()
    texts = [sdt.output(), agent.output()] + [r.stdout + r.stderr for r in results]
    assert "registered agent context-monitor" in texts[0]
    for text in texts:
        for secret in certs.secrets:
            assert secret not in text


def test_new_client_key_is_authorised_without_restart(spawn, certs, tmp_path):
    cert_dir = tmp_path / "live-certs"
    cert_dir.mkdir()
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret"):
        (cert_dir / name).write_bytes((certs.dir / name).read_bytes())
    sdt = spawn("system-digital-twin", ZMQ_CERTIFICATES_DIR=cert_dir)
    assert zmq_request(sdt.port, b"ping", certs.rogue, 0.3) is None
    # Dropping the public key into the directory authorises that client (rescanned every 2 s).
    (cert_dir / "rogue.key").write_bytes(
        (certs.rogue_secret_file.parent / "rogue.key").read_bytes())
    wait_for(lambda: zmq_request(sdt.port, b"ping", certs.rogue, 0.3) == b"pong", 8,
             "the new key to be authorised")
    assert "authorised client keys reloaded" in sdt.output()
