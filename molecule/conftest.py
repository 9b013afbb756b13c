"""Fixtures shared by the lab scenarios' testinfra tests (molecule/<scenario>/tests).

The lab hosts are containers of the local engine, so testinfra reaches them with its
docker backend; playbook runs use the project's ansible.cfg (inventory/lab).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import testinfra

PROJECT_DIR = Path(__file__).resolve().parents[1]
LAB_HOSTS = ("ai-lab-mainpc", "ai-lab-pc2")
RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)


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
