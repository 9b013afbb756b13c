#!/usr/bin/env python3
"""Stand-in agent for the two-machine ZeroMQ/CurveZMQ AI system.

It speaks the system's wire protocol exactly (see README.md next to this file):

* a ZMQ REP socket on the main port and one on the health port (main port + 1000),
  both CURVE servers when SECURE_ZMQ=1;
* the health protocol (``{"action": "health_check"}`` or any non-JSON frame on the
  health port; ``{"action": "ping"|"health"|"health_check"}`` and the string ``ping`` on
  the main port);
* the service registry (system-digital-twin): legacy ``REGISTER``/``DISCOVER`` commands and
  the newer ``register_agent``/``get_agent_endpoint``/``list_agents`` actions;
* registration of ordinary agents with the registry, retried forever.

Subcommands: ``serve`` (default), ``healthcheck`` (for Docker's HEALTHCHECK) and ``query``
(send one request and print the reply).

Only the standard library and pyzmq are used. Nothing is written except log lines to stdout.
"""

import argparse
import datetime
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

REGISTRY_NAME = "system-digital-twin"
DEFAULT_CERT_DIR = "/app/certificates"
SERVER_SECRET = "server.key_secret"
SERVER_PUBLIC = "server.key"
CLIENT_SECRET = "client.key_secret"

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CONFIG = 2

REGISTER_RETRY_S = 2.0          # retry interval while not (re-)registered
REREGISTER_EVERY_S = 60.0       # re-registration interval after success
FAILURE_LOG_EVERY_S = 60.0      # rate limit for registration failure log lines
KEY_RESCAN_EVERY_S = 2.0        # how often the authorised-keys directory is re-read
POLL_MS = 200                   # main loop poll slice (bounds SIGTERM latency)
MAX_MSG_SIZE = 1024 * 1024      # peers sending bigger messages are disconnected
MAX_REGISTRY_ENTRIES = 4096
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
HOST_RE = re.compile(r"^[A-Za-z0-9._:%\[\]-]{1,253}$")
HEALTH_ACTIONS = ("health_check", "health", "ping")

log = logging.getLogger("agent")


class ConfigError(Exception):
    """Invalid or incomplete configuration; the process exits with code 2."""


# --------------------------------------------------------------------------- helpers

def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def setup_logging(service):
    level_name = os.environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
    level = getattr(logging, level_name, None)
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler(sys.stdout)
    fmt = logging.Formatter(
        "%(asctime)s %(levelname)s " + service.replace("%", "%%") + ": %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%SZ")
    fmt.converter = time.gmtime
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pyzmq's authenticator logs public keys and ZAP details at debug level only; keep
    # it quiet unless something is wrong.
    logging.getLogger("agent.auth").setLevel(max(level, logging.WARNING))


def env_str(name, default=None):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def env_bool(name, default=False):
    value = env_str(name)
    if value is None:
        return default
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 0 or 1, got {value!r}")


def env_int(name, default=None, minimum=None, maximum=None):
    value = env_str(name)
    if value is None:
        return default
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum or maximum is not None and number > maximum:
        raise ConfigError(f"{name}={number} is out of range [{minimum}, {maximum}]")
    return number


def tcp_endpoint(host, port):
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def port_env_name(service):
    """``task-router`` -> ``TASK_ROUTER_PORT`` (the env files' per-service variables)."""
    return re.sub(r"[^A-Za-z0-9]", "_", service).upper() + "_PORT"


# --------------------------------------------------------------------------- configuration

class Config:
    """Everything read from the environment. Unknown variables are ignored."""

    def __init__(self, need_identity=True):
        self.name = env_str("AGENT_NAME")
        if need_identity and not self.name:
            raise ConfigError("AGENT_NAME is not set (the service name, e.g. task-router)")
        self.name = self.name or "agent"
        if not NAME_RE.match(self.name):
            raise ConfigError(f"AGENT_NAME {self.name!r} is not a valid service name")

        self.role = env_str("AGENT_ROLE", "registry" if self.name == REGISTRY_NAME else "agent")
        self.role = self.role.lower()
        if self.role not in ("registry", "agent"):
            raise ConfigError(f"AGENT_ROLE must be 'registry' or 'agent', got {self.role!r}")

        self.machine = env_str("MACHINE_TYPE", "UNKNOWN")
        self.bind_address = env_str("BIND_ADDRESS", "0.0.0.0")
        self.secure = env_bool("SECURE_ZMQ", False)
        self.cert_dir = env_str("ZMQ_CERTIFICATES_DIR", DEFAULT_CERT_DIR)
        self.sdt_host = env_str("SYSTEM_DIGITAL_TWIN_HOST", REGISTRY_NAME)
        self.sdt_port = env_int("SYSTEM_DIGITAL_TWIN_PORT", 7120, 1, 65535)
        self.discovery = env_bool("SERVICE_DISCOVERY_ENABLED", False)
        self.timeout_ms = env_int("ZMQ_REQUEST_TIMEOUT", 5000, 1, 3_600_000)
        self.retries = env_int("CONNECTION_RETRIES", 3, 1, 1000)
        self.advertise_host = env_str("AGENT_ADVERTISE_HOST", self.name)
        self.force_unhealthy = env_bool("AGENT_FORCE_UNHEALTHY", False)
        if not HOST_RE.match(self.advertise_host):
            raise ConfigError(f"AGENT_ADVERTISE_HOST {self.advertise_host!r} is not a host name")

        port = env_int("AGENT_PORT", None, 1, 65535)
        if port is None:
            port = env_int(port_env_name(self.name), None, 1, 65535)
        if port is None and self.role == "registry":
            port = self.sdt_port
        if port is None and need_identity:
            raise ConfigError(f"AGENT_PORT (or {port_env_name(self.name)}) is not set")
        self.port = port
        default_health = port + 1000 if port is not None else None
        self.health_port = env_int("HEALTH_PORT", default_health, 1, 65535)
        if self.health_port is None:
            if need_identity:
                raise ConfigError("HEALTH_PORT (or AGENT_PORT) is not set")
        elif self.health_port > 65535:
            raise ConfigError(f"health port {self.health_port} > 65535: set HEALTH_PORT")
        if need_identity and self.health_port == self.port:
            raise ConfigError("HEALTH_PORT must differ from AGENT_PORT")

    @property
    def registers(self):
        return self.role == "agent" and self.discovery

    def cert_path(self, filename):
        return os.path.join(self.cert_dir, filename)

    def loopback_host(self):
        """Address the healthcheck uses to reach this container's own health socket."""
        if self.bind_address in ("0.0.0.0", "*", "::", "[::]"):
            return "127.0.0.1"
        return self.bind_address


# --------------------------------------------------------------------------- CURVE plumbing

def load_keypair(path, what):
    """Return (public, secret) from a certificate file; raise ConfigError without leaking keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} is missing")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        raise ConfigError(f"{what} {path} is not a readable ZeroMQ certificate") from None
    if not public or not secret:
        raise ConfigError(f"{what} {path} holds no secret key")
    return public, secret


def load_public(path, what):
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} is missing")
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        raise ConfigError(f"{what} {path} is not a readable ZeroMQ certificate") from None
    return public


class ClientKeys:
    def __init__(self, cert_dir, client_secret=None, server_public=None):
        client_secret = client_secret or os.path.join(cert_dir, CLIENT_SECRET)
        server_public = server_public or os.path.join(cert_dir, SERVER_PUBLIC)
        self.public, self.secret = load_keypair(client_secret, "client certificate")
        self.server = load_public(server_public, "server public key")

    def apply(self, sock):
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


def key_dir_signature(cert_dir):
    try:
        entries = sorted(e for e in os.listdir(cert_dir) if e.endswith(".key"))
        return tuple((e, os.stat(os.path.join(cert_dir, e)).st_mtime_ns) for e in entries)
    except OSError:
        return None


def request_once(ctx, endpoint, payload, timeout_s, keys=None, stop=None):
    """Send one frame on a fresh REQ socket; return the reply bytes or None on timeout."""
    sock = ctx.socket(zmq.REQ)
    try:
        sock.linger = 0
        sock.rcvtimeo = int(timeout_s * 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
        if ":" in endpoint.split("//", 1)[-1].rsplit(":", 1)[0]:
            sock.ipv6 = True
        if keys is not None:
            keys.apply(sock)
        sock.connect(endpoint)
        sock.send(payload)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                return None
            if sock.poll(int(min(remaining, 0.1) * 1000) + 1, zmq.POLLIN):
                return sock.recv()
    finally:
        sock.close(linger=0)


# --------------------------------------------------------------------------- agent state

class State:
    def __init__(self, cfg):
        self.cfg = cfg
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.registered = False
        self.last_error = None
        self.registry = {}  # name -> record (registry role only)

    def set_registered(self, value, error=None):
        with self.lock:
            self.registered = value
            self.last_error = error

    def health(self):
        cfg = self.cfg
        with self.lock:
            registered, last_error = self.registered, self.last_error
            agents = len(self.registry)
        if cfg.force_unhealthy:
            status, message = "error", "forced unhealthy (AGENT_FORCE_UNHEALTHY=1)"
        elif cfg.registers and not registered:
            status = "degraded"
            message = f"not registered with {REGISTRY_NAME} at {cfg.sdt_host}:{cfg.sdt_port}"
            if last_error:
                message += f" ({last_error})"
        elif cfg.role == "registry":
            status, message = "ok", f"registry ready, {agents} agents registered"
        elif cfg.registers:
            status = "ok"
            message = f"registered with {REGISTRY_NAME} at {cfg.sdt_host}:{cfg.sdt_port}"
        else:
            status, message = "ok", "running"
        return {
            "status": status,
            "ready": status == "ok",
            "initialized": True,
            "message": message,
            "timestamp": utc_now(),
            "uptime": round(time.monotonic() - self.started, 3),
            "health_status": {"ok": "healthy", "degraded": "degraded"}.get(status, "unhealthy"),
            "service": cfg.name,
            "machine": cfg.machine,
        }

    # ---- registry ----------------------------------------------------------------------

    def register(self, name, location, host, port, health_port=None):
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError("'name' must be a service name")
        if not isinstance(host, str) or not HOST_RE.match(host):
            raise ValueError("'host'/'ip' must be a host name or address")
        port = _port(port, "port")
        health_port = _port(health_port, "health_port") if health_port is not None else None
        location = str(location)[:64] if location is not None else "UNKNOWN"
        now = utc_now()
        with self.lock:
            old = self.registry.get(name)
            if old is None and len(self.registry) >= MAX_REGISTRY_ENTRIES:
                raise ValueError("registry is full")
            record = {
                "name": name,
                "location": location,
                "ip": host,
                "host": host,
                "port": port,
                "health_port": health_port,
                "registered_at": now,
                "last_seen": now,
            }
            changed = old is None or any(old[k] != record[k]
                                         for k in ("location", "host", "port", "health_port"))
            if not changed:
                record["registered_at"] = old["registered_at"]
            self.registry[name] = record
        (log.info if changed else log.debug)(
            "registered agent %s at %s:%s (health %s, location %s)",
            name, host, port, health_port, location)
        return dict(record)

    def lookup(self, name):
        with self.lock:
            record = self.registry.get(name)
            return dict(record) if record else None

    def list_agents(self):
        with self.lock:
            return [dict(self.registry[k]) for k in sorted(self.registry)]


def _port(value, field):
    if isinstance(value, bool):
        raise ValueError(f"'{field}' must be a port number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"'{field}' must be a port number") from None
    if not 1 <= number <= 65535 or (isinstance(value, float) and value != number):
        raise ValueError(f"'{field}' must be a port number")
    return number


# --------------------------------------------------------------------------- request handling

def error(message):
    return {"status": "error", "message": message}


def handle_registry_request(state, req):
    """Return a reply dict for registry requests, or None when req is not one."""
    command = req.get("command")
    if command is not None:
        command = str(command).upper()
        payload = req.get("payload")
        if not isinstance(payload, dict):
            return {"status": "error", "message": "'payload' must be an object"}
        if command == "REGISTER":
            try:
                state.register(payload.get("name"), payload.get("location"),
                               payload.get("ip", payload.get("host")), payload.get("port"),
                               payload.get("health_port"))
            except ValueError as exc:
                return {"status": "error", "message": str(exc)}
            return {"status": "SUCCESS"}
        if command == "DISCOVER":
            name = payload.get("name")
            record = state.lookup(name) if isinstance(name, str) else None
            if record is None:
                return {"status": "NOT_FOUND", "message": f"service {name!r} is not registered"}
            return {"status": "SUCCESS", "payload": record}
        return {"status": "error", "message": f"unknown command {command!r}"}

    action = req.get("action")
    if action == "register_agent":
        src = req.get("payload") if isinstance(req.get("payload"), dict) else req
        try:
            record = state.register(src.get("name", src.get("agent_name")), src.get("location"),
                                    src.get("host", src.get("ip")), src.get("port"),
                                    src.get("health_port"))
        except ValueError as exc:
            return error(str(exc))
        return {"status": "ok", "message": f"registered {record['name']}", "agent": record}
    if action == "get_agent_endpoint":
        name = req.get("agent_name", req.get("name"))
        record = state.lookup(name) if isinstance(name, str) else None
        if record is None:
            return {"status": "error", "message": f"agent {name!r} is not registered"}
        return {
            "status": "ok",
            "agent_name": record["name"],
            "endpoint": tcp_endpoint(record["host"], record["port"]),
            "host": record["host"],
            "ip": record["ip"],
            "port": record["port"],
            "health_port": record["health_port"],
            "location": record["location"],
        }
    if action == "list_agents":
        agents = state.list_agents()
        return {"status": "ok", "agents": agents, "count": len(agents)}
    return None


def handle_main(state, frames):
    """Main port: returns reply bytes. Never raises."""
    if len(frames) != 1:
        return _json(error("expected a single-frame request"))
    raw = frames[0]
    if raw.strip() == b"ping":
        return b"pong"
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return _json(error("request is not JSON (send {\"action\": \"health_check\"})"))
    if not isinstance(req, dict):
        return _json(error("request must be a JSON object"))
    if req.get("action") in HEALTH_ACTIONS:
        return _json(state.health())
    if state.cfg.role == "registry":
        reply = handle_registry_request(state, req)
        if reply is not None:
            return _json(reply)
    what = req.get("action", req.get("command"))
    hint = "" if state.cfg.role == "registry" else f" ({state.cfg.name} is not the registry)"
    return _json(error(f"unknown request {str(what)[:64]!r}{hint}"))


def handle_health(state, frames):
    """Health port: anything that is not a JSON object with another action is a health check."""
    req = None
    if len(frames) == 1:
        try:
            req = json.loads(frames[0].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            req = None
    if isinstance(req, dict) and "action" in req and req["action"] not in HEALTH_ACTIONS:
        return _json(error(f"unknown action {str(req['action'])[:64]!r} on the health port"))
    return _json(state.health())


def _json(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- registration

class Registrar(threading.Thread):
    """Registers this agent with system-digital-twin, retrying forever."""

    def __init__(self, ctx, cfg, state, keys, stop):
        super().__init__(name="registrar", daemon=True)
        self.ctx, self.cfg, self.state, self.keys, self.stop = ctx, cfg, state, keys, stop
        self.endpoint = tcp_endpoint(cfg.sdt_host, cfg.sdt_port)
        self.where = f"{cfg.sdt_host}:{cfg.sdt_port}"
        self.message = _json({
            "action": "register_agent",
            "name": cfg.name,
            "location": cfg.machine,
            "host": cfg.advertise_host,
            "port": cfg.port,
            "health_port": cfg.health_port,
        })

    def attempt(self):
        """One registration attempt on a fresh REQ socket. Returns None or a failure reason."""
        try:
            socket.getaddrinfo(self.cfg.sdt_host, self.cfg.sdt_port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            return f"cannot resolve {self.cfg.sdt_host}: {getattr(exc, 'strerror', None) or exc}"
        try:
            raw = request_once(self.ctx, self.endpoint, self.message, self.cfg.timeout_ms / 1000,
                               self.keys, self.stop)
        except zmq.ZMQError as exc:
            return f"zmq error: {exc}"
        if raw is None:
            return f"no reply within {self.cfg.timeout_ms} ms"
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return "registry sent a non-JSON reply"
        if not isinstance(reply, dict):
            return "registry sent an unexpected reply"
        if str(reply.get("status", "")).lower() not in ("ok", "success"):
            return f"registry refused: {str(reply.get('message', reply.get('status')))[:200]}"
        return None

    def run(self):
        failures = 0
        suppressed = 0
        last_failure_log = None
        delay = 0.0
        while not self.stop.wait(delay):
            reason = self.attempt()
            if self.stop.is_set():
                return
            if reason is None:
                if not self.state.registered:
                    log.info("registered with %s at %s as %s:%s (health port %s)", REGISTRY_NAME,
                             self.where, self.cfg.advertise_host, self.cfg.port,
                             self.cfg.health_port)
                elif failures:
                    log.info("re-registration with %s succeeded after %d failures",
                             self.where, failures)
                self.state.set_registered(True)
                failures = suppressed = 0
                last_failure_log = None
                delay = REREGISTER_EVERY_S
                continue
            failures += 1
            was_registered = self.state.registered
            if was_registered and failures < self.cfg.retries:
                self.state.set_registered(True, reason)
            else:
                self.state.set_registered(False, reason)
                if was_registered:
                    log.warning("re-registration failed %d times in a row, now degraded",
                                failures)
            now = time.monotonic()
            if last_failure_log is None or now - last_failure_log >= FAILURE_LOG_EVERY_S:
                extra = f" ({suppressed} more failures not logged)" if suppressed else ""
                log.warning("registration with %s at %s failed: %s; retrying every %.0f s%s",
                            REGISTRY_NAME, self.where, reason, REGISTER_RETRY_S, extra)
                last_failure_log = now
                suppressed = 0
            else:
                suppressed += 1
            delay = REGISTER_RETRY_S


# --------------------------------------------------------------------------- serve

def make_server_socket(ctx, cfg, port, server_keys):
    sock = ctx.socket(zmq.REP)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
    if server_keys is not None:
        sock.curve_publickey, sock.curve_secretkey = server_keys
        sock.curve_server = True
    if ":" in cfg.bind_address.strip("[]"):
        sock.ipv6 = True
    try:
        sock.bind(tcp_endpoint(cfg.bind_address.strip("[]"), port))
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def serve():
    try:
        cfg = Config(need_identity=True)
    except ConfigError as exc:
        setup_logging(env_str("AGENT_NAME", "agent"))
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    setup_logging(cfg.name)

    server_keys = client_keys = None
    if cfg.secure:
        try:
            if not os.path.isdir(cfg.cert_dir):
                raise ConfigError(f"certificates directory {cfg.cert_dir} is missing")
            server_keys = load_keypair(cfg.cert_path(SERVER_SECRET), "server certificate")
            if cfg.registers:
                client_keys = ClientKeys(cfg.cert_dir)
        except ConfigError as exc:
            log.error("SECURE_ZMQ=1 but %s; refusing to start (mount the CURVE certificates "
                      "at ZMQ_CERTIFICATES_DIR or set SECURE_ZMQ=0)", exc)
            return EXIT_CONFIG

    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        # Only set flags here: the main loop notices within POLL_MS and logs.
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ctx = zmq.Context()
    auth = None
    sockets = []
    registrar = None
    code = EXIT_OK
    try:
        if cfg.secure:
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("agent.auth"))
            auth.start()
            auth.configure_curve(domain="*", location=cfg.cert_dir)
        key_signature = key_dir_signature(cfg.cert_dir) if cfg.secure else None
        try:
            main_sock = make_server_socket(ctx, cfg, cfg.port, server_keys)
            sockets.append(main_sock)
            health_sock = make_server_socket(ctx, cfg, cfg.health_port, server_keys)
            sockets.append(health_sock)
        except zmq.ZMQError as exc:
            log.error("cannot bind %s ports %s/%s: %s", cfg.bind_address, cfg.port,
                      cfg.health_port, exc)
            return EXIT_FAIL
        state = State(cfg)
        log.info("%s listening on %s main port %d, health port %d (machine %s, role %s, "
                 "CURVE %s)", cfg.name, cfg.bind_address, cfg.port, cfg.health_port,
                 cfg.machine, cfg.role, "on" if cfg.secure else "off")
        if cfg.role == "registry":
            state.register(cfg.name, cfg.machine, cfg.advertise_host, cfg.port, cfg.health_port)
        if cfg.registers:
            registrar = Registrar(ctx, cfg, state, client_keys, stop)
            registrar.start()
        elif cfg.role == "agent":
            log.info("service discovery disabled, not registering")

        poller = zmq.Poller()
        poller.register(main_sock, zmq.POLLIN)
        poller.register(health_sock, zmq.POLLIN)
        handlers = {main_sock: handle_main, health_sock: handle_health}
        next_rescan = time.monotonic() + KEY_RESCAN_EVERY_S
        while not stop.is_set():
            try:
                events = dict(poller.poll(POLL_MS))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            for sock, handler in handlers.items():
                if sock not in events:
                    continue
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                try:
                    reply = handler(state, frames)
                except Exception as exc:  # never crash on bad input
                    log.warning("internal error while handling a request: %s",
                                type(exc).__name__)
                    reply = _json(error("internal error"))
                try:
                    sock.send(reply)
                except zmq.ZMQError as exc:
                    log.warning("could not send reply: %s", exc)
            if auth is not None and time.monotonic() >= next_rescan:
                next_rescan = time.monotonic() + KEY_RESCAN_EVERY_S
                signature = key_dir_signature(cfg.cert_dir)
                if signature != key_signature:
                    key_signature = signature
                    auth.configure_curve(domain="*", location=cfg.cert_dir)
                    log.info("authorised client keys reloaded (%d *.key files)",
                             len(signature or ()))
        if received:
            log.info("received %s, shutting down", signal.Signals(received[0]).name)
    except Exception as exc:
        log.error("fatal: %s: %s", type(exc).__name__, exc)
        code = EXIT_FAIL
    finally:
        stop.set()
        for sock in sockets:
            sock.close(linger=0)
        if registrar is not None:
            registrar.join(timeout=0.5)
        if auth is not None:
            auth.stop()
        if registrar is not None and registrar.is_alive():
            # Stuck in a name lookup: do not wait for it.
            logging.shutdown()
            sys.stdout.flush()
            os._exit(code)
        ctx.term()
    log.info("stopped")
    return code


# --------------------------------------------------------------------------- client commands

def client_context(args, cfg):
    keys = None
    if cfg.secure:
        keys = ClientKeys(cfg.cert_dir, getattr(args, "client_secret", None),
                          getattr(args, "server_key", None))
    return keys


def healthcheck(args):
    """Exit 0 only if the local health socket answers status "ok"; 1 otherwise (never 2:
    Docker reserves that code)."""
    try:
        cfg = Config(need_identity=False)
        port = args.port or cfg.health_port
        if port is None:
            raise ConfigError("HEALTH_PORT (or AGENT_PORT) is not set; or pass --port")
        host = args.host or cfg.loopback_host()
        keys = client_context(args, cfg)
    except ConfigError as exc:
        print(f"unhealthy: configuration error: {exc}")
        return EXIT_FAIL
    ctx = zmq.Context()
    try:
        raw = request_once(ctx, tcp_endpoint(host, port), _json({"action": "health_check"}),
                           args.timeout, keys)
    except zmq.ZMQError as exc:
        print(f"unhealthy: {exc}")
        return EXIT_FAIL
    finally:
        ctx.destroy(linger=0)
    if raw is None:
        print(f"unhealthy: no reply from {host}:{port} within {args.timeout:g} s")
        return EXIT_FAIL
    try:
        reply = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        print("unhealthy: reply is not JSON")
        return EXIT_FAIL
    if not isinstance(reply, dict):
        print("unhealthy: reply is not a JSON object")
        return EXIT_FAIL
    status = reply.get("status")
    message = str(reply.get("message", ""))[:300]
    if status == "ok":
        print(f"healthy: {message}")
        return EXIT_OK
    print(f"unhealthy: status {status!r}: {message}")
    return EXIT_FAIL


def query(args):
    """Send one request (JSON or raw text) and print the reply. Exit 1 on timeout."""
    if args.json is not None:
        try:
            payload = _json(json.loads(args.json))
        except ValueError as exc:
            print(f"--json is not valid JSON: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    else:
        payload = args.raw.encode("utf-8")
    try:
        cfg = Config(need_identity=False)
        keys = client_context(args, cfg)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    timeout = args.timeout if args.timeout is not None else cfg.timeout_ms / 1000
    ctx = zmq.Context()
    try:
        raw = request_once(ctx, tcp_endpoint(args.host, args.port), payload, timeout, keys)
    except zmq.ZMQError as exc:
        print(f"request failed: {exc}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        ctx.destroy(linger=0)
    if raw is None:
        print(f"no reply from {args.host}:{args.port} within {timeout:g} s", file=sys.stderr)
        return EXIT_FAIL
    sys.stdout.write(raw.decode("utf-8", errors="replace") + "\n")
    return EXIT_OK


def positive_float(text):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="agent.py", description="Stand-in ZeroMQ agent (configured by environment).")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the agent (default)")

    def key_options(p):
        p.add_argument("--client-secret", metavar="FILE",
                       help="client certificate (default: $ZMQ_CERTIFICATES_DIR/client.key_secret)")
        p.add_argument("--server-key", metavar="FILE",
                       help="server public key (default: $ZMQ_CERTIFICATES_DIR/server.key)")

    hc = sub.add_parser("healthcheck", help="check the local health socket (Docker HEALTHCHECK)")
    hc.add_argument("--timeout", type=positive_float, default=3.0, help="seconds (default 3)")
    hc.add_argument("--host", help="default 127.0.0.1 (or BIND_ADDRESS if not a wildcard)")
    hc.add_argument("--port", type=int, help="default HEALTH_PORT / AGENT_PORT+1000")
    key_options(hc)

    q = sub.add_parser("query", help="send one request and print the reply")
    q.add_argument("--host", required=True)
    q.add_argument("--port", type=int, required=True)
    body = q.add_mutually_exclusive_group(required=True)
    body.add_argument("--json", help="JSON request, e.g. '{\"action\": \"list_agents\"}'")
    body.add_argument("--raw", help="raw text request, e.g. ping")
    q.add_argument("--timeout", type=positive_float,
                   help="seconds (default ZMQ_REQUEST_TIMEOUT / 1000)")
    key_options(q)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "healthcheck":
        return healthcheck(args)
    if args.command == "query":
        return query(args)
    return serve()


if __name__ == "__main__":
    sys.exit(main())
