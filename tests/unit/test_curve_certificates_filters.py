"""roles/curve_certificates/filter_plugins: keys are never replaced by accident, and recovered exactly.

Real key pairs (zmq.auth.create_certificates) in temporary directories stand for the
controller's certificates/ and the hosts' key directories.
"""

import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import zmq.auth

PROJECT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("curve_certificates_filters",
                                               PROJECT / "roles/curve_certificates/filter_plugins/curve_certificates.py")
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)

NAMES = ["server", "client", "health-probe"]
PAIRS = ["server", "client"]


def make_pairs(directory: Path, names=NAMES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        zmq.auth.create_certificates(str(directory), name)
    return directory


def public_key(path: Path) -> str:
    return re.search(r'public-key = "(.*)"', path.read_text()).group(1)


def secret_key(path: Path) -> str:
    return re.search(r'secret-key = "(.*)"', path.read_text()).group(1)


def fp(path: Path) -> str:
    return hashlib.sha256(public_key(path).encode()).hexdigest()[:16]


def layout(host_dir: Path):
    return filters.curve_certificates_layout(PAIRS, "health-probe", str(host_dir / "certificates"),
                                             str(host_dir / "health-probe"), "10001", "10001")


def distribute(controller: Path, host_dir: Path):
    """Put the controller's files on a host as the role does."""
    for entry in layout(host_dir):
        Path(entry["dest"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(controller / entry["src"], entry["dest"])


def find_result(host_dir: Path) -> dict:
    """What ansible.builtin.find (get_checksum) returns for a host's key directories."""
    files = [p for d in ("certificates", "health-probe") for p in sorted((host_dir / d).glob("*.key*"))]
    return {"files": [{"path": str(p), "checksum": hashlib.sha1(p.read_bytes()).hexdigest(), "mode": "0644",
                       "uid": 10001, "pw_name": "ai"} for p in files]}


def host_view(host_dir: Path, controller_state: dict, read=True) -> dict:
    """The role's per-host view: its key files by controller name, and the public keys it had to read."""
    files = filters.curve_certificates_host_keys(find_result(host_dir), layout(host_dir))
    unknown = filters.curve_certificates_unknown_public(files, controller_state)
    lines = [f'{p}:    public-key = "{public_key(Path(p))}"' for p in unknown] if read else []
    return {"files": files,
            "fingerprints": filters.curve_certificates_public_fingerprints({"stdout_lines": lines} if lines else
                                                                           {"skipped": True})}


@pytest.fixture
def lab(tmp_path):
    """A controller directory and two hosts that hold its pairs, as after a deployment."""
    controller = make_pairs(tmp_path / "controller")
    hosts = {name: tmp_path / name for name in ("ai-lab-mainpc", "ai-lab-pc2")}
    for host_dir in hosts.values():
        distribute(controller, host_dir)
    return controller, hosts


def check(controller: Path, hosts: dict) -> dict:
    state = filters.curve_certificates_controller_keys(str(controller), NAMES)
    return filters.curve_certificates_key_check(state, {h: host_view(d, state) for h, d in hosts.items()})


def secrets(*dirs: Path) -> list:
    return [secret_key(p) for d in dirs for p in d.rglob("*.key_secret")]


def test_fingerprint_is_the_short_sha256_of_the_z85_public_key():
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    assert filters.curve_certificates_fingerprint(key) == hashlib.sha256(key.encode()).hexdigest()[:16]


def test_layout_maps_the_probe_pair_and_the_server_key_into_the_probe_directory(tmp_path):
    entries = {e["dest"]: e for e in layout(tmp_path)}
    probe = tmp_path / "health-probe"
    assert entries[str(probe / "client.key")]["src"] == "health-probe.key"
    assert entries[str(probe / "client.key_secret")] == {
        "src": "health-probe.key_secret", "dest": str(probe / "client.key_secret"), "mode": "0600",
        "owner": "root", "group": "root", "secret": True}
    assert entries[str(probe / "server.key")]["src"] == "server.key"
    # The probe's secret never lands in the containers' directory.
    assert str(tmp_path / "certificates" / "health-probe.key_secret") not in entries
    assert sorted(e["src"] for e in entries.values() if e["secret"]) == [
        "client.key_secret", "health-probe.key_secret", "server.key_secret"]


def test_a_deployed_system_passes_without_reading_any_public_key(lab):
    controller, hosts = lab
    state = filters.curve_certificates_controller_keys(str(controller), NAMES)
    assert state["problems"] == []
    for host_dir in hosts.values():
        files = filters.curve_certificates_host_keys(find_result(host_dir), layout(host_dir))
        assert filters.curve_certificates_unknown_public(files, state) == []
    assert check(controller, hosts) == {"refuse": False, "message": "", "states": {
        s: "same" for s in ("server.key", "client.key", "health-probe.key", "server.key_secret",
                            "client.key_secret", "health-probe.key_secret")}}


def test_a_first_deployment_goes_on(tmp_path):
    controller = tmp_path / "controller"  # not made yet: the role makes the pairs
    hosts = {"ai-lab-mainpc": tmp_path / "a", "ai-lab-pc2": tmp_path / "b"}
    assert check(controller, hosts)["refuse"] is False
    controller = make_pairs(controller)
    assert check(controller, hosts)["refuse"] is False


def test_a_new_host_without_keys_gets_the_controller_pairs(lab, tmp_path):
    controller, hosts = lab
    assert check(controller, {**hosts, "ai-lab-pc3": tmp_path / "new"})["refuse"] is False


def test_a_lost_controller_directory_is_refused_naming_hosts_and_fingerprints(lab):
    controller, hosts = lab
    prints = {n: fp(controller / f"{n}.key") for n in NAMES}
    keep = secrets(controller)
    shutil.rmtree(controller)
    result = check(controller, hosts)
    assert result["refuse"] is True
    message = result["message"]
    assert message.startswith("Refusing to replace the CurveZMQ keys the hosts hold (nothing was changed)")
    assert f"that the controller's directory {controller} does not" in message
    for name in NAMES:
        assert f"{name}: controller missing; ai-lab-mainpc {prints[name]}, ai-lab-pc2 {prints[name]}" in message
    for way in (f"restore {controller} from a backup", "ansible-playbook playbooks/recover-keys.yml`",
                "ansible-playbook playbooks/rotate-keys.yml"):
        assert way in message
    assert not any(secret in message for secret in keep)


def test_a_controller_with_other_pairs_is_refused(lab, tmp_path):
    controller, hosts = lab
    host_print = fp(controller / "server.key")
    other = make_pairs(tmp_path / "other")
    shutil.rmtree(controller)
    shutil.copytree(other, controller)
    result = check(controller, hosts)
    assert result["refuse"] and set(result["states"].values()) == {"differs"}
    assert f"server: controller {fp(other / 'server.key')}; ai-lab-mainpc {host_print}, ai-lab-pc2 {host_print}" \
        in result["message"]
    assert "-e curve_certificates_recover_replace=true" in result["message"]
    assert not any(secret in result["message"] for secret in secrets(controller, *hosts.values()))


def test_one_pair_missing_on_the_controller_is_refused(lab):
    controller, hosts = lab
    (controller / "client.key").unlink()
    (controller / "client.key_secret").unlink()
    result = check(controller, hosts)
    assert result["refuse"]
    assert result["states"]["client.key"] == result["states"]["client.key_secret"] == "missing"
    assert result["states"]["server.key"] == "same"
    assert "(client) that the controller's directory" in result["message"]


def test_a_different_secret_with_the_same_public_key_is_refused(lab):
    controller, hosts = lab
    secret = controller / "server.key_secret"
    secret.write_text(secret.read_text().replace("#   ****  Generated", "#   ****  Edited"))
    result = check(controller, hosts)
    assert result["refuse"] and result["states"]["server.key_secret"] == "differs"
    assert "same public key, but the secret file differs" in result["message"]


def test_a_public_file_with_the_same_key_is_not_a_replacement(lab):
    controller, hosts = lab
    public = controller / "client.key"
    public.write_text(public.read_text().replace("#   ****  Generated", "#   ****  Copied"))
    result = check(controller, hosts)
    assert result["refuse"] is False and result["states"]["client.key"] == "same"


def test_hosts_that_disagree_are_refused(lab, tmp_path):
    controller, hosts = lab
    other = make_pairs(tmp_path / "other", ["server"])
    pc2 = hosts["ai-lab-pc2"]
    for dest in ("certificates/server.key", "health-probe/server.key"):
        shutil.copyfile(other / "server.key", pc2 / dest)
    shutil.copyfile(other / "server.key_secret", pc2 / "certificates/server.key_secret")
    result = check(controller, hosts)
    assert result["refuse"] and result["states"]["server.key"] == "disagree"
    assert "the hosts hold different keys (server)" in result["message"]
    assert (f"server: controller {fp(controller / 'server.key')}; ai-lab-mainpc {fp(controller / 'server.key')}, "
            f"ai-lab-pc2 {fp(other / 'server.key')} (the secret files differ too)") in result["message"]
    assert "remove the key files of the hosts whose keys are wrong" in result["message"]
    # Also without the controller's directory.
    shutil.rmtree(controller)
    assert check(controller, hosts)["states"]["server.key"] == "disagree"


def test_one_host_holding_two_server_keys_is_refused(lab, tmp_path):
    controller, hosts = lab
    other = make_pairs(tmp_path / "other", ["server"])
    shutil.copyfile(other / "server.key", hosts["ai-lab-pc2"] / "health-probe/server.key")
    result = check(controller, hosts)
    assert result["refuse"]
    assert f"ai-lab-pc2 {fp(controller / 'server.key')}/{fp(other / 'server.key')}" in result["message"]


@pytest.mark.parametrize("present,problem", [
    ("client.key", "client.key is there without its secret half client.key_secret"),
    ("client.key_secret", "client.key_secret is there without its public half client.key"),
])
def test_a_half_pair_on_the_controller_is_refused_clearly(lab, present, problem):
    controller, hosts = lab
    for path in controller.glob("client.key*"):
        if path.name != present:
            path.unlink()
    state = filters.curve_certificates_controller_keys(str(controller), NAMES)
    assert state["problems"] == [problem]
    message = filters.curve_certificates_controller_refusal(state)
    assert message.startswith(f"Refusing to run with the controller's CurveZMQ key pairs in {controller} as they are "
                              f"(nothing was changed): {problem}.")
    assert "playbooks/recover-keys.yml" in message and "force=true" not in message
    assert not any(secret in message for secret in secrets(controller))


def test_a_pair_whose_files_hold_different_public_keys_is_a_problem(lab, tmp_path):
    controller, _ = lab
    other = make_pairs(tmp_path / "other", ["client"])
    shutil.copyfile(other / "client.key", controller / "client.key")
    state = filters.curve_certificates_controller_keys(str(controller), NAMES)
    assert state["problems"] == [f"client.key ({fp(other / 'client.key')}) and client.key_secret "
                                 f"({fp(controller / 'client.key_secret')}) hold different public keys"]


def test_a_symlinked_key_file_on_the_controller_is_a_problem(lab):
    controller, _ = lab
    target = controller / "elsewhere"
    (controller / "server.key_secret").rename(target)
    (controller / "server.key_secret").symlink_to(target)
    state = filters.curve_certificates_controller_keys(str(controller), NAMES)
    assert "server.key_secret is not a regular file" in state["problems"]


def test_only_public_keys_that_are_not_the_controllers_are_read(lab, tmp_path):
    controller, hosts = lab
    other = make_pairs(tmp_path / "other", ["client"])
    pc2 = hosts["ai-lab-pc2"]
    shutil.copyfile(other / "client.key", pc2 / "certificates/client.key")
    state = filters.curve_certificates_controller_keys(str(controller), NAMES)
    files = filters.curve_certificates_host_keys(find_result(pc2), layout(pc2))
    assert filters.curve_certificates_unknown_public(files, state) == [str(pc2 / "certificates/client.key")]
    # Secret files are never among them.
    shutil.copyfile(other / "client.key_secret", pc2 / "certificates/client.key_secret")
    files = filters.curve_certificates_host_keys(find_result(pc2), layout(pc2))
    assert filters.curve_certificates_unknown_public(files, state) == [str(pc2 / "certificates/client.key")]


def test_grep_output_gives_fingerprints():
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    read = {"stdout_lines": [f'/etc/ai-system/certificates/server.key:    public-key = "{key}"', "garbage"]}
    assert filters.curve_certificates_public_fingerprints(read) == {
        "/etc/ai-system/certificates/server.key": filters.curve_certificates_fingerprint(key)}
    assert filters.curve_certificates_public_fingerprints({"skipped": True}) == {}
    assert filters.curve_certificates_public_fingerprints(None) == {}


def recover(controller: Path, hosts: dict, replace=False) -> dict:
    state = filters.curve_certificates_controller_keys(str(controller), NAMES)
    views = {h: host_view(d, state) for h, d in hosts.items()}
    return filters.curve_certificates_recover_plan(state, views, layout(next(iter(hosts.values()))), replace)


def apply(plan: dict, controller: Path):
    controller.mkdir(exist_ok=True)
    for f in plan["files"]:
        shutil.copyfile(f["path"], controller / f["src"])


def test_recovery_rebuilds_the_controller_byte_for_byte(lab):
    controller, hosts = lab
    saved = {p.name: p.read_bytes() for p in controller.iterdir()}
    shutil.rmtree(controller)
    plan = recover(controller, hosts)
    assert plan["ok"], plan["message"]
    assert sorted(f["src"] for f in plan["files"]) == sorted(saved)
    # From the first host; the server key from the containers' directory, not the probe's.
    assert {f["host"] for f in plan["files"]} == {"ai-lab-mainpc"}
    assert next(f for f in plan["files"] if f["src"] == "server.key")["path"].endswith("certificates/server.key")
    assert next(f for f in plan["files"] if f["src"] == "health-probe.key_secret")["path"].endswith(
        "health-probe/client.key_secret")
    assert [f["secret"] for f in plan["files"] if f["src"].endswith("_secret")] == [True] * 3
    apply(plan, controller)
    assert {p.name: p.read_bytes() for p in controller.iterdir()} == saved
    # Then the role finds everything in place, and a second recovery has nothing to write.
    assert check(controller, hosts) == {"refuse": False, "message": "", "states": {
        s: "same" for s in saved}}
    again = recover(controller, hosts)
    assert again["ok"] and again["files"] == [] and "already holds the hosts' keys" in again["message"]
    assert not any(secret in plan["message"] + again["message"] for secret in secrets(controller))


def test_recovery_writes_only_what_is_missing(lab):
    controller, hosts = lab
    (controller / "client.key_secret").unlink()
    plan = recover(controller, hosts)
    assert plan["ok"] and [f["src"] for f in plan["files"]] == ["client.key_secret"]


def test_recovery_refuses_hosts_that_disagree(lab, tmp_path):
    controller, hosts = lab
    other = make_pairs(tmp_path / "other", ["client"])
    shutil.copyfile(other / "client.key", hosts["ai-lab-pc2"] / "certificates/client.key")
    shutil.rmtree(controller)
    plan = recover(controller, hosts)
    assert not plan["ok"] and plan["files"] == []
    assert "the hosts hold different keys (client)" in plan["message"]
    assert "recover-keys.yml --limit HOST" in plan["message"]
    # From the host whose keys are right (--limit), it goes on.
    assert recover(controller, {"ai-lab-mainpc": hosts["ai-lab-mainpc"]})["ok"]


def test_recovery_refuses_to_replace_other_controller_pairs_unless_asked(lab, tmp_path):
    controller, hosts = lab
    host_print = fp(controller / "server.key")
    other = make_pairs(tmp_path / "other", ["server"])
    for name in ("server.key", "server.key_secret"):
        shutil.copyfile(other / name, controller / name)
    plan = recover(controller, hosts)
    assert not plan["ok"]
    assert "the controller's pairs server in" in plan["message"]
    assert f"server: controller {fp(other / 'server.key')}; ai-lab-mainpc {host_print}" in plan["message"]
    plan = recover(controller, hosts, replace=True)
    assert plan["ok"] and sorted(f["src"] for f in plan["files"]) == ["server.key", "server.key_secret"]


def test_recovery_refuses_a_secret_no_host_holds(lab):
    controller, hosts = lab
    for host_dir in hosts.values():
        (host_dir / "certificates/server.key_secret").unlink()
    shutil.rmtree(controller)
    plan = recover(controller, hosts)
    assert not plan["ok"]
    assert "no host holds server.key_secret, so it cannot be recovered" in plan["message"]
    assert "rotate-keys.yml" in plan["message"]


def test_recovery_keeps_a_controller_file_no_host_holds(lab):
    controller, hosts = lab
    for host_dir in hosts.values():
        (host_dir / "certificates/server.key_secret").unlink()
    plan = recover(controller, hosts)
    assert plan["ok"] and plan["files"] == []


def test_recovery_with_no_keys_on_any_host(tmp_path):
    plan = recover(tmp_path / "controller", {"ai-lab-mainpc": tmp_path / "a"})
    assert not plan["ok"] and "there is nothing to recover" in plan["message"]


def test_the_role_puts_back_the_directory_files_the_project_keeps():
    files = PROJECT / "roles/curve_certificates/files"
    assert (files / "certificates.gitignore").read_text() == (PROJECT / "certificates/.gitignore").read_text()
    assert (files / "certificates.README.md").read_text() == (PROJECT / "certificates/README.md").read_text()
    ignored = (files / "certificates.gitignore").read_text().split()
    assert ignored[ignored.index("*"):] == ["*", "!.gitignore", "!README.md"]


def test_a_failed_no_log_copy_is_explained_without_the_key(tmp_path):
    """The rescue of a no_log copy names the file and the reason, never the key."""
    make_pairs(tmp_path, ["client"])
    public, secret = zmq.auth.load_certificate(str(tmp_path / "client.key_secret"))
    failed = {"results": [
        {"failed": False, "item": {"dest": "/etc/ai-system/certificates/server.key_secret"}},
        {"failed": True, "item": {"dest": "/etc/ai-system/certificates/client.key_secret"},
         "msg": f"could not write {secret.decode()} (No space left on device)"},
    ]}
    reason = filters.curve_certificates_failure(failed)
    assert reason.startswith("/etc/ai-system/certificates/client.key_secret: could not write ")
    assert "No space left on device" in reason and "server.key_secret" not in reason
    assert secret.decode() not in reason and public.decode() not in reason
    assert filters.curve_certificates_failure({"msg": "Failed to connect to the host via ssh"}) == (
        "Failed to connect to the host via ssh")
    assert len(filters.curve_certificates_failure({"msg": "x" * 1000})) == 300
    assert filters.curve_certificates_failure(None) == "no message"


def test_complete_only_when_every_pair_is_usable_with_its_modes(tmp_path):
    """complete lets the role skip asking zmq_curve_keypair: it must be false for anything the module would mend."""
    directory = make_pairs(tmp_path / "certs")
    for name in NAMES:
        (directory / f"{name}.key").chmod(0o644)
        (directory / f"{name}.key_secret").chmod(0o600)
    assert filters.curve_certificates_controller_keys(str(directory), NAMES)["complete"]

    (directory / "client.key_secret").chmod(0o640)
    assert not filters.curve_certificates_controller_keys(str(directory), NAMES)["complete"]
    (directory / "client.key_secret").chmod(0o600)

    assert not filters.curve_certificates_controller_keys(str(directory), NAMES + ["extra"])["complete"]

    secret = directory / "server.key_secret"
    secret.write_text(re.sub(r'secret-key = "[^"]*"', 'secret-key = ""', secret.read_text()))
    view = filters.curve_certificates_controller_keys(str(directory), NAMES)
    assert not view["complete"] and view["problems"] == ["server.key_secret holds no secret key"]
