"""Keys are never replaced by accident (issue 11, items 1 to 3), on the converged lab.

A lost certificates/ directory used to be a silent rotation: site.yml made new pairs, copied
them to both hosts and recreated every container. Now the run is refused before any host
changes, recover-keys.yml rebuilds the directory from the hosts, and the next site.yml run
has nothing to change. Hosts that disagree and a controller pair without its secret are
refused the same way. The controller's certificates/ is always put back as it was.
"""

import hashlib
import re
import shlex
import shutil
import subprocess

import pytest
import zmq.auth
from conftest import PROJECT_DIR, containers, play_recap, run_playbook, secret_keys

CERTS = PROJECT_DIR / "certificates"
SITE = PROJECT_DIR / "site.yml"
RECOVER = PROJECT_DIR / "playbooks" / "recover-keys.yml"
NAMES = ("server", "client", "health-probe")
HOST_DIRS = "/etc/ai-system/certificates /etc/ai-system/health-probe"
REFUSED = "Refusing to replace the CurveZMQ keys the hosts hold (nothing was changed)"


def fingerprint(public_key_text: str) -> str:
    key = re.search(r'public-key\s*=\s*"([^"]+)"', public_key_text).group(1)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def key_files(directory=CERTS) -> dict:
    """{name: bytes} of the key files in a controller directory."""
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.key*")) if p.is_file()}


def host_key_files(host) -> str:
    """Path, mode, owner, mtime and sha256 of every file in a host's key directories (no content leaves the host)."""
    return host.check_output(
        f"find {HOST_DIRS} -type f -printf '%p %m %u %T@\\n' | sort && find {HOST_DIRS} -type f -exec sha256sum {{}} + | sort")


def lab_state(mainpc, pc2):
    """What a refused run must leave alone: the hosts' key files and the containers."""
    return {"mainpc keys": host_key_files(mainpc), "pc2 keys": host_key_files(pc2),
            "mainpc containers": containers(mainpc, "mainpc"), "pc2 containers": containers(pc2, "pc2")}


def assert_nothing_changed(result, before, mainpc, pc2):
    recap = play_recap(result.stdout)
    assert recap, result.stdout[-3000:]
    assert all(counts["changed"] == 0 for counts in recap.values()), (recap, result.stdout[-5000:])
    after = lab_state(mainpc, pc2)
    for what in before:
        assert after[what] == before[what], f"a refused run changed the {what}"


def git_status_of_certificates() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "certificates"],
                          cwd=PROJECT_DIR, text=True, capture_output=True, check=True).stdout


@pytest.fixture
def controller_kept(tmp_path_factory):
    """Keep a copy of the controller's certificates/ and always put it back as it was."""
    saved = tmp_path_factory.mktemp("certificates-kept") / "certificates"
    shutil.copytree(CERTS, saved, symlinks=True)
    try:
        yield saved
    finally:
        if not CERTS.is_dir() or key_files() != key_files(saved) or not (CERTS / ".gitignore").exists() \
                or not (CERTS / "README.md").exists():
            if CERTS.exists():
                shutil.rmtree(CERTS)
            shutil.copytree(saved, CERTS, symlinks=True)
        shutil.rmtree(saved)


def test_a_lost_certificates_directory_is_refused_in_check_mode_too(mainpc, pc2, controller_kept):
    before = lab_state(mainpc, pc2)
    shutil.rmtree(CERTS)
    result = run_playbook(SITE, "--check", "--diff", check=False)
    assert result.returncode != 0 and REFUSED in result.stdout, \
        f"a check run without the controller's keys predicted no refusal:\n{result.stdout[-5000:]}"
    assert_nothing_changed(result, before, mainpc, pc2)
    assert not CERTS.exists()


def test_a_lost_certificates_directory_is_refused_then_recovered(mainpc, pc2, controller_kept):
    saved = key_files()
    prints = {name: fingerprint((CERTS / f"{name}.key").read_text()) for name in NAMES}
    # The hosts hold the controller's keys (the fingerprints the refusal shows for them).
    for host in (mainpc, pc2):
        for name in NAMES:
            assert fingerprint(host.file(f"/etc/ai-system/certificates/{name}.key").content_string) == prints[name]
    secrets = secret_keys()
    before = lab_state(mainpc, pc2)

    shutil.rmtree(CERTS)  # a fresh clone, another laptop, a wiped directory
    refused = run_playbook(SITE, check=False)
    # Before issue 11 this run made new pairs, copied them to both hosts and recreated every container.
    assert refused.returncode != 0 and REFUSED in refused.stdout, \
        f"site.yml went on without the controller's keys (a silent rotation):\n{refused.stdout[-5000:]}"
    for name in NAMES:
        assert f"{name}: controller missing; ai-lab-mainpc {prints[name]}, ai-lab-pc2 {prints[name]}" in refused.stdout
    for way in (f"restore {CERTS} from a backup", "playbooks/recover-keys.yml", "playbooks/rotate-keys.yml"):
        assert way in refused.stdout
    assert_nothing_changed(refused, before, mainpc, pc2)
    assert not CERTS.exists() or not key_files(), "the controller made new pairs before the refusal"

    recovered = run_playbook(RECOVER, "--diff", "-v")
    assert "holds the hosts' pairs again" in recovered.stdout
    assert key_files() == saved, "recover-keys.yml did not rebuild the controller's pairs byte for byte"
    for name in NAMES:
        assert (CERTS / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
        assert (CERTS / f"{name}.key").stat().st_mode & 0o777 == 0o644
    assert CERTS.stat().st_mode & 0o777 == 0o700
    for secret in secrets:
        assert secret not in recovered.stdout and secret not in recovered.stderr, "a secret key appears in the output"
    assert git_status_of_certificates() == "", "certificates/ offers files for commit after the recovery"
    assert lab_state(mainpc, pc2) == before, "recover-keys.yml changed a host"

    again = run_playbook(SITE)
    recap = play_recap(again.stdout)
    assert recap and all(counts["changed"] == 0 for counts in recap.values()), (recap, again.stdout[-5000:])


def test_hosts_that_disagree_are_refused(mainpc, pc2, controller_kept, tmp_path):
    zmq.auth.create_certificates(str(tmp_path), "client")
    other = (tmp_path / "client.key").read_text()
    ours = fingerprint((CERTS / "client.key").read_text())
    path = "/etc/ai-system/certificates/client.key"
    pc2.check_output(f"cp -a {path} /root/test_7_keys.client.key")
    try:
        pc2.check_output(f"printf '%s' {shlex.quote(other)} > {path}")  # content only: mode and owner stay
        before = lab_state(mainpc, pc2)
        result = run_playbook(SITE, check=False)
        assert result.returncode != 0 and REFUSED in result.stdout, result.stdout[-5000:]
        assert "the hosts hold different keys (client)" in result.stdout
        assert f"client: controller {ours}; ai-lab-mainpc {ours}, ai-lab-pc2 {fingerprint(other)}" in result.stdout
        assert_nothing_changed(result, before, mainpc, pc2)
        # recover-keys.yml refuses to choose between them too.
        recovered = run_playbook(RECOVER, check=False)
        assert recovered.returncode != 0
        assert "Refusing to recover the controller's CurveZMQ key pairs" in recovered.stdout
        assert "the hosts hold different keys (client)" in recovered.stdout
    finally:
        pc2.check_output(f"mv -f /root/test_7_keys.client.key {path}")
    assert fingerprint(pc2.file(path).content_string) == ours


def test_a_public_key_without_its_secret_is_refused(mainpc, pc2, controller_kept, tmp_path):
    before = lab_state(mainpc, pc2)
    (CERTS / "client.key_secret").rename(tmp_path / "client.key_secret")
    result = run_playbook(SITE, check=False)
    assert result.returncode != 0
    assert "Refusing to run with the controller's CurveZMQ key pairs" in result.stdout, result.stdout[-5000:]
    assert "client.key is there without its secret half client.key_secret" in result.stdout
    assert "force=true" not in result.stdout
    assert_nothing_changed(result, before, mainpc, pc2)
    assert not (CERTS / "client.key_secret").exists(), "the controller replaced the half pair"


def test_the_directory_gets_its_gitignore_and_readme_back(controller_kept):
    role_files = PROJECT_DIR / "roles" / "curve_certificates" / "files"
    (CERTS / ".gitignore").unlink()
    (CERTS / "README.md").unlink()
    result = run_playbook(SITE)
    assert (CERTS / ".gitignore").read_text() == (role_files / "certificates.gitignore").read_text()
    assert (CERTS / "README.md").read_text() == (role_files / "certificates.README.md").read_text()
    assert git_status_of_certificates() == ""
    recap = play_recap(result.stdout)
    assert sum(counts["changed"] for counts in recap.values()) == 1, recap  # only the controller's two files

