"""Filters of the ai_stack role: validate the service catalogue and build the Compose project.

The catalogue is inventory data (group_vars per machine); doing this in Python rather than
in Jinja keeps the checks exhaustive and the rendered Compose file predictable.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

try:
    import jmespath
except ImportError:  # pragma: no cover - jmespath is in requirements.txt
    jmespath = None

SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
SERVICE_KEYS = {
    "name", "port", "health_port", "extra_ports", "depends_on", "gpu", "memory_limit_mb",
    "image", "env", "shared", "health_expect", "healthcheck", "read_only", "command",
    "publish", "cpus", "cpu_shares", "pids_limit", "shm_size", "ulimits",
}
# Resource limits a service may set (Compose `ulimits`); values are an integer (soft = hard)
# or {soft, hard}; -1 is unlimited.
ULIMITS = {"core", "memlock", "nofile", "nproc", "stack"}
SIZE = re.compile(r"^[1-9][0-9]*[bkmg]?$")
# A machine type names the Compose project and the machine's network (lowercased), and the
# agents' MACHINE_TYPE. The types themselves are inventory data (one group per type).
MACHINE_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*$")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def health_port(service: dict, offset: int) -> int:
    return service.get("health_port") or service["port"] + offset


def ai_stack_errors(services: Any, machine_type: Any, gpu_host: bool, default_image: Any,
                    health_port_offset: int = 1000, remote_registry: str = "") -> list[str]:
    """Every problem of the catalogue, each naming the variable and the service.

    remote_registry: the registry service on another machine the agents register with
    (FORCE_LOCAL_SDT=0); they reach it over the shared network, so every service must join it.
    """
    var = "ai_stack_services"
    errors: list[str] = []
    if not isinstance(machine_type, str) or not MACHINE_TYPE.match(machine_type):
        errors.append(f"ai_machine_type: {machine_type!r} must be upper-case letters, digits and underscores "
                      "(MAINPC, PC2): it names the Compose project and the machine's network")
    if not isinstance(services, list) or not services:
        return errors + [f"{var}: must be a non-empty list of services, got {type(services).__name__}"]

    names: list[str] = []
    for index, service in enumerate(services):
        if not isinstance(service, dict):
            errors.append(f"{var}[{index}]: must be a dict, got {type(service).__name__}")
            continue
        name = service.get("name")
        where = f"{var}[{index}] ({name})" if name else f"{var}[{index}]"
        if not isinstance(name, str) or not SERVICE_NAME.match(name):
            errors.append(f"{where}: name must be lowercase letters, digits and dashes")
        elif name in names:
            errors.append(f"{where}: duplicate service name {name!r}")
        else:
            names.append(name)
        unknown = set(service) - SERVICE_KEYS
        if unknown:
            errors.append(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(SERVICE_KEYS)})")
        if not _is_port(service.get("port")):
            errors.append(f"{where}.port: must be an integer 1-65535, got {service.get('port')!r}")
        if "health_port" in service and not _is_port(service["health_port"]):
            errors.append(f"{where}.health_port: must be an integer 1-65535, got {service['health_port']!r}")
        elif _is_port(service.get("port")) and not _is_port(health_port(service, health_port_offset)):
            errors.append(f"{where}.health_port: port + {health_port_offset} is beyond 65535; set health_port")
        extra = service.get("extra_ports", [])
        if not isinstance(extra, list) or not all(_is_port(p) for p in extra):
            errors.append(f"{where}.extra_ports: must be a list of integers 1-65535, got {extra!r}")
        deps = service.get("depends_on", [])
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            errors.append(f"{where}.depends_on: must be a list of service names, got {deps!r}")
        for key in ("gpu", "shared", "read_only"):
            if key in service and not isinstance(service[key], bool):
                errors.append(f"{where}.{key}: must be true or false, got {service[key]!r}")
        if service.get("gpu") is True and not gpu_host:
            errors.append(f"{where}.gpu: GPU service on a host outside the gpu_hosts group")
        errors += _runtime_errors(service, where)
        memory = service.get("memory_limit_mb")
        if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory < 64):
            errors.append(f"{where}.memory_limit_mb: must be an integer >= 64, got {memory!r}")
        image = service.get("image", default_image)
        if not isinstance(image, str) or not image.strip():
            errors.append(f"{where}.image: no image (set the service's image or ai_stack_image)")
        env = service.get("env", {})
        if not isinstance(env, dict):
            errors.append(f"{where}.env: must be a dict, got {type(env).__name__}")
        if remote_registry and name and not service.get("shared"):
            errors.append(f"{where}: not shared, but this machine's agents register with {remote_registry} on "
                          f"another machine (ai_stack_force_local_sdt is false), over the shared network: "
                          f"set shared: true")
        expect = service.get("health_expect")
        if expect is not None:
            if not isinstance(expect, str):
                errors.append(f"{where}.health_expect: must be a JMESPath string")
            elif jmespath is not None:
                try:
                    jmespath.compile(expect)
                except jmespath.exceptions.JMESPathError as exc:
                    errors.append(f"{where}.health_expect: invalid JMESPath {expect!r}: {exc}")

    valid = [s for s in services if isinstance(s, dict) and isinstance(s.get("name"), str)]
    errors += _port_errors(valid, health_port_offset)
    errors += _dependency_errors(valid, set(names))
    return errors


def _runtime_errors(service: dict, where: str) -> list[str]:
    """Publishing and CPU/PID limits (CIS Docker 5.12, 5.14, 5.29)."""
    errors = []
    publish = service.get("publish", False)
    if not isinstance(publish, bool):
        try:
            ipaddress.ip_address(publish if isinstance(publish, str) else None)
        except (TypeError, ValueError):
            errors.append(f"{where}.publish: must be true (on the host's address), false, or an IP address to "
                          f"bind to, got {publish!r}")
    cpus = service.get("cpus")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0.01 <= cpus <= 512):
        errors.append(f"{where}.cpus: must be a number of CPUs from 0.01, got {cpus!r}")
    shares = service.get("cpu_shares")
    if shares is not None and (isinstance(shares, bool) or not isinstance(shares, int) or not 2 <= shares <= 262144):
        errors.append(f"{where}.cpu_shares: must be an integer 2-262144 (1024 is one normal share), got {shares!r}")
    shm = service.get("shm_size")
    if shm is not None and not (isinstance(shm, str) and SIZE.match(shm.lower())):
        errors.append(f"{where}.shm_size: must be a size such as 64m or 2g, got {shm!r}")
    ulimits = service.get("ulimits")
    if ulimits is not None:
        if not isinstance(ulimits, dict):
            errors.append(f"{where}.ulimits: must be a dict of limits, got {type(ulimits).__name__}")
        else:
            for limit, value in ulimits.items():
                if limit not in ULIMITS:
                    errors.append(f"{where}.ulimits: unknown limit {limit!r} (known: {sorted(ULIMITS)})")
                elif not _ulimit_ok(value):
                    errors.append(f"{where}.ulimits.{limit}: must be an integer (-1: unlimited) or "
                                  f"{{soft, hard}} with soft <= hard, got {value!r}")
    pids = service.get("pids_limit")
    if pids is not None and (isinstance(pids, bool) or not isinstance(pids, int) or pids < 16):
        errors.append(f"{where}.pids_limit: must be an integer >= 16 (every container has a PID limit), got {pids!r}")
    return errors


def _ulimit_ok(value: Any) -> bool:
    def number(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= -1
    if isinstance(value, dict):
        soft, hard = value.get("soft"), value.get("hard")
        if set(value) != {"soft", "hard"} or not number(soft) or not number(hard):
            return False
        return hard == -1 or (soft != -1 and soft <= hard)
    return number(value)


def _port_errors(services: list[dict], offset: int) -> list[str]:
    used: dict[int, str] = {}
    errors = []
    for service in services:
        if not _is_port(service.get("port")):
            continue
        ports = [("port", service["port"]), ("health_port", health_port(service, offset))]
        ports += [("extra_ports", p) for p in service.get("extra_ports", []) if _is_port(p)]
        for key, port in ports:
            if not _is_port(port):
                continue
            owner = used.setdefault(port, f"{service['name']}.{key}")
            if owner != f"{service['name']}.{key}":
                errors.append(f"ai_stack_services ({service['name']}).{key}: port {port} is already used by {owner}")
    return errors


def _dependency_errors(services: list[dict], names: set[str]) -> list[str]:
    errors = []
    graph = {}
    for service in services:
        deps = service.get("depends_on", [])
        if not isinstance(deps, list):
            continue
        graph[service["name"]] = [d for d in deps if isinstance(d, str)]
        for dep in graph[service["name"]]:
            if dep not in names:
                errors.append(f"ai_stack_services ({service['name']}).depends_on: no service named {dep!r} on this machine")
            if dep == service["name"]:
                errors.append(f"ai_stack_services ({service['name']}).depends_on: a service cannot depend on itself")
    # Cycles: depth-first search over the known names.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, []):
            if dep not in graph or dep == node:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                errors.append(f"ai_stack_services: dependency cycle {' -> '.join(cycle)}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    return errors


def ai_stack_compose(services: list[dict], settings: dict) -> dict:
    """The Compose project (as a dict) for this machine's services."""
    offset = settings["health_port_offset"]
    local_net, shared_net = settings["local_network"], settings["shared_network"]
    compose_services = {}
    for service in services:
        name = service["name"]
        hport = health_port(service, offset)
        # Main ports are published only when the catalogue asks (true: on the host's own
        # address); other machines reach services over the shared network. Health ports answer
        # only the host's own probe.
        publish = service.get("publish", False)
        address = settings["publish_address"] if publish is True else publish
        ports = [f"{_bracketed(address)}:{p}:{p}" for p in [service["port"], *service.get("extra_ports", [])]] if address else []
        ports.append(f"127.0.0.1:{hport}:{hport}")
        networks = [local_net] + ([shared_net] if service.get("shared") else [])
        spec: dict[str, Any] = {
            "image": service.get("image") or settings["image"],
            "container_name": name,
            "hostname": name,
            "env_file": [settings["env_file"]],
            "environment": {
                "AGENT_NAME": name,
                "AGENT_PORT": str(service["port"]),
                "HEALTH_PORT": str(hport),
                "AGENT_ADVERTISE_HOST": name,
                **{k: str(v) for k, v in service.get("env", {}).items()},
            },
            "user": settings["user"],
            "read_only": service.get("read_only", settings["read_only"]),
            "tmpfs": ["/tmp"],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "mem_limit": f"{service.get('memory_limit_mb', settings['memory_limit_mb'])}m",
            "cpu_shares": service.get("cpu_shares", settings["cpu_shares"]),
            "pids_limit": service.get("pids_limit", settings["pids_limit"]),
            # GPU services (PyTorch-style TTS) get a larger /dev/shm and their own ulimits by default.
            "shm_size": service.get("shm_size", settings["gpu_shm_size" if service.get("gpu") else "shm_size"]),
            "restart": "unless-stopped",
            "logging": settings["logging"],
            "ports": ports,
            "volumes": [
                f"{settings['certificates_dir']}:/app/certificates:ro",
                f"{settings['logs_dir']}:/app/logs",
            ],
            "networks": networks,
            "healthcheck": service.get("healthcheck", settings["healthcheck"]),
            "labels": {
                # Changes when the key files change, so rotation recreates the containers.
                "ai-system.certificates": settings["certificates_digest"],
                "ai-system.health-port": str(hport),
            },
        }
        if service.get("cpus") is not None:
            spec["cpus"] = service["cpus"]
        ulimits = service.get("ulimits", settings["gpu_ulimits" if service.get("gpu") else "ulimits"])
        if ulimits:
            spec["ulimits"] = dict(ulimits)
        if service.get("command"):
            spec["command"] = service["command"]
        deps = service.get("depends_on", [])
        if deps:
            spec["depends_on"] = {d: {"condition": "service_healthy"} for d in deps}
        if service.get("gpu") and settings["gpu_reservations"]:
            if settings.get("gpu_mode") == "cdi":
                # The GPUs as CDI devices (nvidia_container_toolkit_mode: cdi).
                spec["devices"] = ["nvidia.com/gpu=all"]
            else:
                spec["deploy"] = {"resources": {"reservations": {"devices": [
                    {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}
        spec["labels"][CONFIG_DIGEST_LABEL] = config_digest(spec, settings.get("env_digest", ""))
        compose_services[name] = spec

    used_networks = {local_net} | ({shared_net} if any(s.get("shared") for s in services) else set())
    return {
        "name": settings["project"],
        "services": compose_services,
        # Both networks are made by the swarm_network role; Compose only attaches to them.
        "networks": {n: {"external": True} for n in sorted(used_networks)},
    }


CONFIG_DIGEST_LABEL = "ai-system.config-digest"


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in str(address) else str(address)


def config_digest(spec: dict, env_digest: str = "") -> str:
    """A digest of everything a service is rendered from (its Compose entry and the env
    file), kept as a label: a container whose label differs was made from another
    configuration. Compose's own `config --hash` does not match the hash it writes to its
    label in Compose 2.26 (Debian 13), so the project keeps its own."""
    import hashlib
    import json

    rendered = {k: v for k, v in spec.items() if k != "labels"}
    rendered["labels"] = {k: v for k, v in spec.get("labels", {}).items() if k != CONFIG_DIGEST_LABEL}
    text = json.dumps(rendered, sort_keys=True, default=str) + "\n" + env_digest
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ai_stack_service_ports(services: list[dict], offset: int = 1000) -> dict[str, int]:
    """{SERVICE_NAME_PORT: port} for the env file, as the seed's env files list them."""
    env = {}
    for service in services:
        env[service["name"].upper().replace("-", "_") + "_PORT"] = service["port"]
        env[service["name"].upper().replace("-", "_") + "_HEALTH_PORT"] = health_port(service, offset)
    return env


def ai_stack_health_endpoints(services: list[dict], offset: int = 1000, address: str = "127.0.0.1") -> list[dict]:
    """zmq_health endpoints for every service's health port."""
    endpoints = []
    for service in services:
        endpoint = {"name": service["name"], "url": f"tcp://{address}:{health_port(service, offset)}"}
        if service.get("health_expect"):
            endpoint["expect"] = service["health_expect"]
        endpoints.append(endpoint)
    return endpoints


def ai_stack_compose_health_endpoints(compose: dict, address: str = "127.0.0.1") -> list[dict]:
    """zmq_health endpoints of a rendered Compose project (from its health-port labels)."""
    return [
        {"name": name, "url": f"tcp://{address}:{spec['labels']['ai-system.health-port']}"}
        for name, spec in compose.get("services", {}).items()
        if "ai-system.health-port" in spec.get("labels", {})
    ]


def ai_stack_runtime_drift(containers: list[dict], compose: dict, running: dict | None = None,
                           env_file: str = "") -> list[str]:
    """How the running containers differ from the Compose project (what a deploy would fix).

    `containers` is the engine's container list (docker_host_info); `running` is what
    ai_stack_running_config reads from `docker inspect`; with it, every setting the project
    renders is compared (ai_stack_config_drift).
    """
    by_name = {c["Names"][0].lstrip("/"): c for c in containers if c.get("Names")}
    differences = ai_stack_config_drift(running or {}, compose, env_file) if running else {}
    findings = []
    for name, spec in compose.get("services", {}).items():
        container = by_name.get(spec.get("container_name", name))
        if container is None:
            findings.append(f"{name}: container missing (would be created)")
            continue
        if container.get("State") != "running":
            findings.append(f"{name}: container {container.get('State')} (would be started)")
        if not running and container.get("Image") != spec["image"]:
            findings.append(f"{name}: runs image {container.get('Image')}, expected {spec['image']} (would be recreated)")
        expected_keys = spec.get("labels", {}).get("ai-system.certificates")
        if expected_keys and container.get("Labels", {}).get("ai-system.certificates") != expected_keys:
            findings.append(f"{name}: started with other CURVE keys (would be recreated)")
        if differences.get(name):
            findings.append(f"{name}: differs from its configuration: {'; '.join(differences[name])} (would be recreated)")
        if "(unhealthy)" in container.get("Status", ""):
            findings.append(f"{name}: Docker healthcheck reports unhealthy")
    for name in sorted(set(by_name) - {s.get("container_name", n) for n, s in compose.get("services", {}).items()}):
        findings.append(f"{name}: container not in the Compose project (would be removed)")
    return findings


OTHER_CONFIGURATION = "created from another configuration"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)")
_DURATION_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([bkmg]?)b?$", re.I)
_SIZE_BYTES = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def ai_stack_running_config(output: str) -> dict:
    """The project's containers as `docker inspect` prints them (tasks/prepare.yml)."""
    import json

    try:
        containers = json.loads(output) if (output or "").strip() else []
    except ValueError:
        containers = []
    return {"containers": containers if isinstance(containers, list) else []}


def _duration_ns(value: Any) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    return sum(int(float(n) * _DURATION_NS[u]) for n, u in _DURATION.findall(str(value)))


def _size_bytes(value: Any) -> int:
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value).strip())
    return int(float(match[1]) * _SIZE_BYTES[match[2].lower()]) if match else -1


def _env_file_vars(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (text or "").splitlines() if "=" in line and not line.lstrip().startswith("#"))
    return {k.strip(): v for k, v in pairs}


def _wanted_ports(spec: dict) -> set[tuple[str, str, str]]:
    wanted = set()
    for entry in spec.get("ports", []):
        address, host_port, container_port = str(entry).rsplit(":", 2) if str(entry).count(":") >= 2 else ("", *str(entry).split(":"))
        proto = "udp" if container_port.endswith("/udp") else "tcp"
        wanted.add((address.strip("[]"), host_port, f"{container_port.split('/')[0]}/{proto}"))
    return wanted


def _running_ports(info: dict) -> set[tuple[str, str, str]]:
    bindings = (info.get("HostConfig") or {}).get("PortBindings") or {}
    return {(b.get("HostIp", ""), b.get("HostPort", ""), port) for port, binds in bindings.items() for b in binds or []}


def _wanted_mounts(spec: dict) -> set[tuple[str, str, bool]]:
    mounts = set()
    for entry in spec.get("volumes", []):
        parts = str(entry).split(":")
        mounts.add((parts[0], parts[1], not (len(parts) > 2 and "ro" in parts[2].split(","))))
    return mounts


def _running_mounts(info: dict) -> set[tuple[str, str, bool]]:
    return {(m.get("Source", ""), m.get("Destination", ""), bool(m.get("RW")))
            for m in info.get("Mounts") or [] if m.get("Type") == "bind"}


def _wanted_ulimits(spec: dict) -> set[tuple[str, int, int]]:
    wanted = set()
    for name, value in (spec.get("ulimits") or {}).items():
        soft, hard = (value["soft"], value["hard"]) if isinstance(value, dict) else (value, value)
        wanted.add((name, soft, hard))
    return wanted


def _running_ulimits(host: dict) -> set[tuple[str, int, int]]:
    return {(u.get("Name"), u.get("Soft"), u.get("Hard")) for u in host.get("Ulimits") or []}


def _healthcheck(spec: dict) -> dict:
    check = spec.get("healthcheck") or {}
    test = check.get("test")
    return {"Test": [test] if isinstance(test, str) else test,
            **{key: _duration_ns(check[name]) for key, name in (("Interval", "interval"), ("Timeout", "timeout"),
                                                                  ("StartPeriod", "start_period"),
                                                                  ("StartInterval", "start_interval")) if name in check},
            **({"Retries": check["retries"]} if "retries" in check else {})}


def _gpu_wanted(spec: dict) -> bool:
    # The nvidia runtime's device request, or CDI devices (both show as DeviceRequests).
    return bool(((spec.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices")) \
        or any("=" in str(d) for d in spec.get("devices", []))


def ai_stack_config_drift(running: dict, compose: dict, env_file: str = "") -> dict[str, list[str]]:
    """{service: [what differs]} between each container's running configuration and the
    Compose project: every setting the role renders, and the project's config digest label.

    Environment differences name the keys only: values may be secret.
    """
    by_name = {c.get("Name", "").lstrip("/"): c for c in running.get("containers", [])}
    env_common = _env_file_vars(env_file)
    drift: dict[str, list[str]] = {}
    for name, spec in compose.get("services", {}).items():
        info = by_name.get(spec.get("container_name", name))
        if info is None:
            continue
        config, host = info.get("Config") or {}, info.get("HostConfig") or {}
        found = []
        if config.get("Image") != spec.get("image"):
            found.append(f"image: {config.get('Image')} running, {spec.get('image')} wanted")
        labels = config.get("Labels") or {}
        wanted_digest = (spec.get("labels") or {}).get(CONFIG_DIGEST_LABEL)
        if wanted_digest and labels.get(CONFIG_DIGEST_LABEL) != wanted_digest:
            found.append(OTHER_CONFIGURATION)
        env_running = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
        env_wanted = {**env_common, **{k: str(v) for k, v in (spec.get("environment") or {}).items()}}
        env_keys = sorted(k for k, v in env_wanted.items() if env_running.get(k) != v)
        if env_keys:
            found.append(f"environment: {', '.join(env_keys)}")
        memory = _size_bytes(spec["mem_limit"]) if "mem_limit" in spec else None
        if memory is not None and host.get("Memory") != memory:
            found.append(f"memory: {host.get('Memory', 0) // 1024 ** 2}m running, {memory // 1024 ** 2}m wanted")
        if "cpu_shares" in spec and host.get("CpuShares") != spec["cpu_shares"]:
            found.append(f"CPU shares: {host.get('CpuShares') or 'none'} running, {spec['cpu_shares']} wanted")
        if round((host.get("NanoCpus") or 0) / 1e9, 2) != round(float(spec.get("cpus") or 0), 2):
            found.append(f"CPUs: {(host.get('NanoCpus') or 0) / 1e9:g} running, {spec.get('cpus') or 0} wanted")
        if "shm_size" in spec and host.get("ShmSize") != _size_bytes(spec["shm_size"]):
            found.append(f"shm size: {(host.get('ShmSize') or 0) // 1024 ** 2}m running, {spec['shm_size']} wanted")
        if _running_ulimits(host) != _wanted_ulimits(spec):
            found.append("ulimits")
        if "pids_limit" in spec and host.get("PidsLimit") != spec["pids_limit"]:
            found.append(f"PID limit: {host.get('PidsLimit') or 'none'} running, {spec['pids_limit']} wanted")
        if _running_ports(info) != _wanted_ports(spec):
            found.append("ports: " + ", ".join(sorted(f"{a}:{h}->{c}" for a, h, c in _running_ports(info)) or ["none"])
                         + " running, " + ", ".join(sorted(f"{a}:{h}->{c}" for a, h, c in _wanted_ports(spec)) or ["none"])
                         + " wanted")
        if _running_mounts(info) != _wanted_mounts(spec):
            found.append("volumes")
        if "command" in spec:
            command = spec["command"].split() if isinstance(spec["command"], str) else list(spec["command"])
            if list(config.get("Cmd") or []) != command:
                found.append("command")
        if spec.get("healthcheck"):
            wanted = _healthcheck(spec)
            actual = config.get("Healthcheck") or {}
            if any(actual.get(k) != v for k, v in wanted.items()):
                found.append("healthcheck")
        if "user" in spec and config.get("User", "") != spec["user"]:
            found.append(f"user: {config.get('User') or 'image default'} running, {spec['user']} wanted")
        if sorted(host.get("SecurityOpt") or []) != sorted(spec.get("security_opt", [])):
            found.append("security options")
        if "read_only" in spec and bool(host.get("ReadonlyRootfs")) != bool(spec["read_only"]):
            found.append("read-only root filesystem")
        if sorted(host.get("CapDrop") or []) != sorted(spec.get("cap_drop", [])):
            found.append("dropped capabilities")
        if "tmpfs" in spec and sorted(host.get("Tmpfs") or {}) != sorted(spec["tmpfs"]):
            found.append("tmpfs")
        networks = sorted(((info.get("NetworkSettings") or {}).get("Networks") or {}))
        if "networks" in spec and networks != sorted(spec["networks"]):
            found.append(f"networks: {', '.join(networks) or 'none'} running, {', '.join(sorted(spec['networks']))} wanted")
        if any(labels.get(k) != v for k, v in (spec.get("labels") or {}).items() if k != CONFIG_DIGEST_LABEL):
            found.append("labels")
        logging = spec.get("logging") or {}
        log_config = host.get("LogConfig") or {}
        if logging and (log_config.get("Type") != logging.get("driver")
                        or (log_config.get("Config") or {}) != {k: str(v) for k, v in (logging.get("options") or {}).items()}):
            found.append("logging")
        if "restart" in spec and (host.get("RestartPolicy") or {}).get("Name") != spec["restart"]:
            found.append("restart policy")
        if bool(host.get("DeviceRequests")) != _gpu_wanted(spec):
            found.append("GPU reservation")
        if found:
            drift[name] = found
    return drift


def ai_stack_changed_outside_compose(running: dict, compose: dict, env_file: str = "") -> list[str]:
    """Services that differ from the project although they were made from its current
    configuration (digest label): `docker compose up` would leave them as they are, so a
    deploy recreates them itself."""
    return sorted(name for name, found in ai_stack_config_drift(running or {}, compose, env_file).items()
                  if OTHER_CONFIGURATION not in found)


def ai_stack_gpu_lost(health: dict, lost: list[str]) -> dict:
    """The health result with the GPU services that see no GPU marked `gpu_lost` (unhealthy)."""
    lost = set(lost or [])
    if not lost or "endpoints" not in (health or {}):
        return health
    endpoints = [dict(e, state="gpu_lost", healthy=False,
                      message="answers over ZMQ, but nvidia-smi -L sees no GPU in the container")
                 if e.get("name") in lost else e for e in health["endpoints"]]
    return dict(health, endpoints=endpoints, unhealthy_count=sum(not e.get("healthy") for e in endpoints),
                healthy_count=sum(bool(e.get("healthy")) for e in endpoints))


def ai_stack_unhealthy(health: dict) -> list[str]:
    """'name: state' of every unhealthy endpoint of a zmq_health result."""
    return [f"{e['name']}: {e['state']}" for e in health.get("endpoints", []) if not e.get("healthy")]


def ai_stack_health_table(results_by_host: dict) -> list[str]:
    """A table of every service on every host with its zmq_health state and latency."""
    rows = [f"{'HOST':<16} {'SERVICE':<30} {'STATE':<12} LATENCY"]
    for host, health in results_by_host.items():
        for endpoint in (health or {}).get("endpoints", []):
            latency = endpoint.get("latency_ms")
            shown = f"{latency:.1f} ms" if isinstance(latency, (int, float)) else "-"
            rows.append(f"{host:<16} {endpoint['name']:<30} {endpoint['state']:<12} {shown}")
    return rows


def ai_stack_image_digests(images: list[dict], wanted: list[str]) -> dict[str, str]:
    """{image reference: registry digest} for the wanted references, from image inspect data.

    An image that came from an archive (`load`) or a local build has no registry digest: ''.
    """
    digests = {}
    for ref in wanted:
        repository = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
        found = [info for info in images or [] if ref in (info.get("RepoTags") or [])]
        repo_digests = [d for info in found for d in info.get("RepoDigests") or []]
        digests[ref] = next((d.split("@", 1)[1] for d in repo_digests if d.split("@", 1)[0] == repository), "")
    return digests


def ai_stack_image_table(digests_by_host: dict) -> list[str]:
    """Which image (reference and registry digest) each host runs."""
    rows = [f"{'HOST':<16} {'IMAGE':<44} DIGEST"]
    for host, digests in digests_by_host.items():
        for ref, digest in (digests or {}).items():
            rows.append(f"{host:<16} {ref:<44} {digest or '(no registry digest)'}")
    return rows


# Docker's own error texts, first match wins: what an operator must fix for each.
PULL_FAILURES = (
    (re.compile(r"unauthorized|authentication required|incorrect username or password|\b401\b", re.I),
     "The registry refused the credentials (check ai_stack_image_registry_username and the vaulted password)"),
    (re.compile(r"x509|certificate", re.I),
     "The registry's TLS certificate is not trusted (set ai_stack_image_registry_ca_cert to its CA)"),
    (re.compile(r"manifest unknown|not found|does not exist|\b404\b", re.I),
     "The registry does not have this image or tag (check ai_stack_image_tag)"),
    (re.compile(r"connection refused|no such host|timeout|dial tcp|no route to host|server misbehaving", re.I),
     "The registry does not answer (is it running, and is ai_stack_image_registry right?)"),
)


def ai_stack_pull_failure(error: str, secret: str = "") -> str:
    """Why a login or pull failed, for the operator, with `secret` masked in the details."""
    error = str(error or "")
    if secret:
        error = error.replace(secret, "********")
    reason = next((text for pattern, text in PULL_FAILURES if pattern.search(error)), "The pull failed")
    detail = " ".join(error.split())
    return f"{reason} ({detail[:400]})" if detail else reason


# Release history (tasks/releases.yml, tasks/rollback_to.yml): releases/index.json on each host
# lists the kept healthy releases, oldest first, and which of them runs now ("current").
RELEASE_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")


def _repository(ref: str) -> str:
    """The repository of an image reference (without tag or digest)."""
    ref = ref.split("@", 1)[0]
    return ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref


def ai_stack_release_index(content: Any) -> dict:
    """The release index as read from the host (slurp's base64-decoded text, or a dict)."""
    import json

    if isinstance(content, dict):
        index = content
    else:
        try:
            index = json.loads(content) if str(content or "").strip() else {}
        except ValueError:
            index = {}
    releases = [r for r in index.get("releases") or [] if isinstance(r, dict) and RELEASE_ID.match(str(r.get("id", "")))]
    releases.sort(key=lambda r: r["id"])
    current = index.get("current") if index.get("current") in {r["id"] for r in releases} else ""
    return {"releases": releases, "current": current}


def ai_stack_release_plan(index: Any, compose_sha1: str, images: dict, now: str, keep: int) -> dict:
    """What recording a healthy deployment does to the release history.

    `compose_sha1`: sha1 of the deployed compose.yaml (it carries the env file's digest, so it
    names the whole project); `images`: {reference: registry digest}; `now`: UTC
    `YYYYmmddTHHMMSSZ`. A release with the same compose file becomes current again (no new
    release); otherwise a new one, `<now>-<12 hex of the sha1>`, is made and becomes current.
    The newest `keep` releases are kept, and always the current one. Returns the new index,
    the id to create ('' for none) and the ids to remove.
    """
    keep = int(keep)
    if keep < 1:
        raise ValueError(f"ai_stack_releases_keep must be at least 1, got {keep}")
    index = ai_stack_release_index(index)
    releases = list(index["releases"])
    same = [r for r in releases if r.get("compose_sha1") == compose_sha1]
    create = ""
    if same:
        current = same[-1]["id"]
    else:
        create = f"{now}-{compose_sha1[:12]}"
        while create in {r["id"] for r in releases}:  # pragma: no cover - same second and digest
            create = f"{now}-{compose_sha1[:12]}x"
        releases.append({"id": create, "time": now, "compose_sha1": compose_sha1, "images": dict(images or {})})
        current = create
    kept = releases[-keep:]
    if current not in {r["id"] for r in kept}:
        # The current release is older than the newest `keep`: it stays, with the newest others.
        others = [r for r in releases if r["id"] != current]
        kept = sorted([r for r in releases if r["id"] == current] + (others[-(keep - 1):] if keep > 1 else []),
                      key=lambda r: r["id"])
    removed = [r["id"] for r in releases if r not in kept]
    return {"index": {"releases": kept, "current": current}, "create": create, "remove": removed}


def ai_stack_release_select(index: Any, wanted: Any, host: str = "") -> dict:
    """The release to roll back to: an id, or 'previous' (the one kept before the current one).

    Returns {'release': manifest or {}, 'error': '' or a sentence for the operator}.
    """
    index = ai_stack_release_index(index)
    releases, current = index["releases"], index["current"]
    wanted = str(wanted or "").strip()
    where = f" on {host}" if host else ""
    kept = ", ".join(r["id"] + (" (current)" if r["id"] == current else "") for r in releases) or "none"
    if not wanted:
        return {"release": {}, "error": "set -e release=<id>|previous"}
    if not releases:
        return {"release": {}, "error": f"No release is recorded{where} yet (a healthy site.yml deploy records one)."}
    if wanted == "previous":
        ids = [r["id"] for r in releases]
        position = ids.index(current) if current else len(ids) - 1
        if position == 0:
            return {"release": {}, "error": f"No release before the current one{where} (kept: {kept})."}
        return {"release": releases[position - 1], "error": ""}
    found = [r for r in releases if r["id"] == wanted]
    if not found:
        return {"release": {}, "error": f"Release {wanted} does not exist{where} (kept: {kept})."}
    return {"release": found[0], "error": ""}


def ai_stack_release_images(index: Any, extra: Any = None) -> dict:
    """{reference: digest} of every kept release (and `extra`, e.g. what this run deployed)."""
    found: dict[str, str] = {}
    for release in ai_stack_release_index(index)["releases"]:
        for ref, digest in (release.get("images") or {}).items():
            found[ref] = found.get(ref) or digest or ""
    for ref, digest in (extra or {}).items():
        found[ref] = found.get(ref) or digest or ""
    return found


def ai_stack_images_to_prune(host_info: dict, referenced: dict, never: Any = ()) -> list[str]:
    """The image references to remove: of the stack's repositories only, referenced by no kept
    release (neither by tag nor by registry digest) and used by no container (running or not).

    `host_info`: a docker_host_info result with images and containers (verbose);
    `referenced`: {reference: digest}, whose repositories are the stack's; `never`:
    repositories never removed (the network anchor). An image nothing needs is removed by all
    its tags (by id when untagged, e.g. a tag that moved); an image still needed loses only its
    unreferenced tags (e.g. lab-next when it is the same image as lab). An image that also
    carries a tag of another repository (an archive loaded by hand, a mirror) is never removed:
    it loses only the stack's unreferenced tags, which untags it and leaves the other tags.
    """
    repositories = {_repository(ref) for ref in referenced} - {_repository(r) for r in never or ()}
    kept_refs = set(referenced)
    kept_digests = {d for d in referenced.values() if d}
    containers = host_info.get("containers") or []
    used_ids = {c.get("ImageID") for c in containers}
    used_names = {c.get("Image") for c in containers}
    remove = []
    for image in host_info.get("images") or []:
        tags = [t for t in image.get("RepoTags") or [] if t and t != "<none>:<none>"]
        digests = [d for d in image.get("RepoDigests") or [] if d and "@" in d and not d.startswith("<none>")]
        names = tags or [d.split("@", 1)[0] for d in digests]
        ours = [n for n in names if _repository(n) in repositories]
        if not ours:
            continue
        foreign = len(ours) < len(names)
        keep_tags = {t for t in tags if t in kept_refs or t in used_names}
        if foreign:
            # Removing a tag of an image with other tags only untags it.
            remove.extend(sorted(set(tags) & set(ours) - keep_tags))
            continue
        needed = bool(keep_tags) or image.get("Id") in used_ids or image.get("Id") in used_names \
            or any(d.split("@", 1)[1] in kept_digests for d in digests)
        if not needed:
            remove.extend(sorted(tags) if tags else [image["Id"]])
        elif keep_tags:
            remove.extend(sorted(set(tags) - keep_tags))
    return remove


def ai_stack_machines(hostvars: Any, hosts: list[str], shared_network: str = "ai-shared-network") -> dict:
    """The inventory's machines, from the variables of the AI hosts (in inventory order).

    Returns ``ips``: for each machine type, the variable that tells every agent where that
    machine is (the type's ``ai_machine_ip_env``, by default ``<TYPE>_IP``) and the address of
    its host; ``service_hosts``: the host that runs each service; ``errors``: what makes the
    machines collide. One host per machine type: two hosts of one type would give their shared
    services the same names on the shared network, where each name must resolve to one container.
    """
    ips: dict[str, str] = {}
    type_hosts: dict[str, list[str]] = {}
    service_hosts: dict[str, str] = {}
    shared_owner: dict[str, str] = {}
    errors: list[str] = []
    for host in hosts:
        hv = hostvars[host]
        machine_type = hv.get("ai_machine_type")
        if not isinstance(machine_type, str) or not machine_type:
            continue  # ai_stack_errors reports it for that host
        type_hosts.setdefault(machine_type, []).append(host)
        if len(type_hosts[machine_type]) > 1:
            continue
        env = hv.get("ai_machine_ip_env") or f"{machine_type}_IP"
        if not isinstance(env, str) or not ENV_NAME.match(env):
            errors.append(f"ai_machine_ip_env of {host}: {env!r} is not an environment variable name")
        elif env in ips:
            errors.append(f"ai_machine_ip_env of {host}: {env} already tells the agents where another machine is")
        else:
            ips[env] = str(hv.get("ai_host_address", ""))
        services = hv.get("ai_stack_services")
        for service in services if isinstance(services, list) else []:
            if not isinstance(service, dict) or not isinstance(service.get("name"), str):
                continue
            service_hosts.setdefault(service["name"], host)
            if service.get("shared"):
                other = shared_owner.setdefault(service["name"], host)
                if other != host:
                    errors.append(
                        f"service {service['name']} of {host} is also a shared service of {other}: names "
                        f"on {shared_network} must be unique, rename one of them")
    for machine_type, names in type_hosts.items():
        if len(names) > 1:
            errors.insert(0, (
                f"{' and '.join(names)} are all of machine type {machine_type}: their services would have "
                f"the same names on {shared_network}, so other machines could not tell them apart. Give "
                f"each machine its own type: a new inventory group with its own ai_machine_type and "
                f"ai_stack_services (docs/lab.md shows one)"))
    return {"ips": ips, "service_hosts": service_hosts, "errors": errors}


class FilterModule:
    def filters(self):
        return {
            "ai_stack_errors": ai_stack_errors,
            "ai_stack_machines": ai_stack_machines,
            "ai_stack_compose": ai_stack_compose,
            "ai_stack_service_ports": ai_stack_service_ports,
            "ai_stack_health_endpoints": ai_stack_health_endpoints,
            "ai_stack_compose_health_endpoints": ai_stack_compose_health_endpoints,
            "ai_stack_runtime_drift": ai_stack_runtime_drift,
            "ai_stack_running_config": ai_stack_running_config,
            "ai_stack_config_drift": ai_stack_config_drift,
            "ai_stack_changed_outside_compose": ai_stack_changed_outside_compose,
            "ai_stack_unhealthy": ai_stack_unhealthy,
            "ai_stack_gpu_lost": ai_stack_gpu_lost,
            "ai_stack_health_table": ai_stack_health_table,
            "ai_stack_pull_failure": ai_stack_pull_failure,
            "ai_stack_image_digests": ai_stack_image_digests,
            "ai_stack_image_table": ai_stack_image_table,
            "ai_stack_release_index": ai_stack_release_index,
            "ai_stack_release_plan": ai_stack_release_plan,
            "ai_stack_release_select": ai_stack_release_select,
            "ai_stack_release_images": ai_stack_release_images,
            "ai_stack_images_to_prune": ai_stack_images_to_prune,
        }
