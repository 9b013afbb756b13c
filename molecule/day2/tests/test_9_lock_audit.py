"""One operator at a time, and an audit trail: a second run is refused while the first holds the
lock; the lock is released after a success and after a failure; a corrupt or stale lock is
refused, changing nothing, until it is broken; check mode and drift-check ignore it; every run
that changes a host leaves one line in that host's audit trail, and manage.yml shows them.

The deploy's details in the audit line (action, per-service results, images, rolled_back) come
from roles/ai_stack/tasks/deploy.yml including the deployment_lock role's `record` entry point
on its success and rescue paths (see roles/deployment_lock/README.md)."""

import getpass
import importlib.machinery
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (PROJECT_DIR, assert_check_mode_predicts_no_change, assert_no_secret, catalogue, containers,
                      play_recap, run_playbook)

SITE = PROJECT_DIR / "site.yml"
MANAGE = PROJECT_DIR / "playbooks" / "manage.yml"
LOCK = "/var/lib/ai-system/deploy.lock"
AUDIT = "/var/log/ai-system/deployments.jsonl"
PC2_SERVICES = set(catalogue("pc2"))
OPERATOR = os.environ.get("AI_DEPLOY_OPERATOR") or os.environ.get("SUDO_USER") or getpass.getuser()


def _callback():
    path = PROJECT_DIR / "callback_plugins" / "deployment_lock.py"
    loader = importlib.machinery.SourceFileLoader("deployment_lock_callback", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def audit(host):
    if not host.file(AUDIT).exists:
        return []
    return [json.loads(line) for line in host.file(AUDIT).content_string.splitlines() if line.strip()]


def lock(host):
    return host.file(LOCK).content_string if host.file(LOCK).exists else None


def write_lock(host, content):
    text = content if isinstance(content, str) else json.dumps(content)
    host.check_output("mkdir -p /var/lib/ai-system && printf '%%s' %s > %s", text, LOCK)


def foreign_lock(age, **fields):
    now = time.time()
    record = {"run_id": "20261127T230000Z-bobs-laptop-4242-0a0b0c", "operator": "bob", "controller": "bobs-laptop",
              "controller_id": "ffffffffffffffff", "pid": 4242, "process": "4242:1", "playbook": "site.yml",
              "limit": "pc2", "since_epoch": now - age, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - age)),
              "version": 1}
    record.update(fields)
    return record


def pc2_state(pc2):
    return containers(pc2, "pc2"), pc2.file("/opt/ai-system/pc2/compose.yaml").sha256sum


@pytest.fixture(autouse=True)
def no_lock_left(mainpc, pc2):
    """Every test starts and ends without a lock; a lock left behind by a run is a failure."""
    for host in (mainpc, pc2):
        host.check_output("rm -f %s", LOCK)
    yield
    left = {name: lock(h) for name, h in (("ai-lab-mainpc", mainpc), ("ai-lab-pc2", pc2)) if lock(h) is not None}
    for host in (mainpc, pc2):
        host.check_output("rm -f %s", LOCK)
    assert not left, f"a lock was left behind: {left}"


@pytest.fixture(scope="module", autouse=True)
def back_to_the_lab_tag():
    yield
    run_playbook(SITE, "--limit", "pc2")


def test_an_idempotent_run_takes_and_releases_the_lock_and_writes_no_line(mainpc, pc2):
    before = audit(mainpc), audit(pc2)
    result = run_playbook(SITE)
    recap = play_recap(result.stdout)
    assert all(counts["changed"] == 0 for counts in recap.values()), recap
    assert "released on ai-lab-mainpc, ai-lab-pc2; no host changed, no audit line." in result.stdout
    assert (audit(mainpc), audit(pc2)) == before


def test_a_rollout_writes_one_audit_line_on_the_host_it_changes(mainpc, pc2):
    mainpc_before = audit(mainpc)
    result = run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_image_tag=lab-next")
    entry = audit(pc2)[-1]
    assert entry["run_id"] in result.stdout
    assert entry["host"] == "ai-lab-pc2" and entry["operator"] == OPERATOR and entry["controller"] == socket.gethostname()
    assert entry["playbook"] == "site.yml" and entry["limit"] == "pc2" and entry["action"] == "deploy"
    assert entry["result"] == "success" and entry["run_result"] == "success" and entry["rolled_back"] is False
    assert entry["services"] == {name: "healthy" for name in PC2_SERVICES}
    assert [(image["tag"], image["digest"].startswith("sha256:")) for image in entry["images"]] == [("lab-next", True)]
    assert entry["lock_broken"] is None and entry["changed"] > 0
    assert audit(mainpc) == mainpc_before, "MainPC was only read"
    assert_no_secret(pc2.file(AUDIT).content_string, result.stdout)


def test_a_second_run_is_refused_within_seconds_while_a_failing_deploy_holds_the_lock(pc2):
    # A deploy whose agents never get healthy holds pc2's lock for the whole health wait (45 s),
    # then is rolled back and fails: its lock must be released all the same.
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT_DIR / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0")
    first = subprocess.Popen([str(Path(sys.executable).parent / "ansible-playbook"), str(SITE), "--limit", "pc2",
                              "-e", "ai_stack_image_tag=lab-broken", "-e", "ai_stack_health_wait_timeout=45"],
                             cwd=PROJECT_DIR, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while lock(pc2) is None:
            assert first.poll() is None, "the first run ended before it held the lock"
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.5)
        holder = json.loads(lock(pc2))
        assert holder["operator"] == OPERATOR and holder["controller"] == socket.gethostname()
        assert holder["playbook"] == "site.yml" and holder["limit"] == "pc2"

        started = time.monotonic()
        second = run_playbook(SITE, "--limit", "pc2", check=False)
        elapsed = time.monotonic() - started
        assert second.returncode != 0
        assert elapsed < 30, f"the second run took {elapsed:.0f} s to be refused"
        assert f"The deployment lock on ai-lab-pc2 is held by run {holder['run_id']} by {OPERATOR}" in second.stdout
        assert "playbook site.yml, limit pc2" in second.stdout and "still running on this controller" in second.stdout
        assert "Nothing was changed" in second.stdout
        assert play_recap(second.stdout)["ai-lab-pc2"]["changed"] == 0
        assert "Check the roles' inputs" not in second.stdout, "refused before anything else"

        # Not even the break flag breaks a live run's lock.
        forced = run_playbook(SITE, "--limit", "pc2", "-e", "ai_deploy_lock_break=true", check=False)
        assert forced.returncode != 0 and "still running on this controller" in forced.stdout
        assert json.loads(lock(pc2))["run_id"] == holder["run_id"]
        assert first.poll() is None, "the first run ended while the others were refused: they proved nothing"
    finally:
        output, _ = first.communicate(timeout=600)

    # The failing run released its lock and recorded the failure and the rollback.
    assert first.returncode != 0 and "Rolled back to the last good deployment" in output, output[-4000:]
    assert lock(pc2) is None
    entry = audit(pc2)[-1]
    assert entry["run_id"] == holder["run_id"]
    assert entry["result"] == "failed" and entry["run_result"] == "failed" and entry["rolled_back"] is True
    assert entry["services"]["advanced-router"] == "bad_reply" and set(entry["services"]) == PC2_SERVICES
    assert [image["tag"] for image in entry["images"]] == ["lab-broken"]
    assert "Rolled back to the last good deployment" in entry["detail"]


def test_a_corrupt_lock_is_refused_and_changes_nothing_until_it_is_broken(mainpc, pc2):
    write_lock(pc2, "half a lock {")
    before = pc2_state(pc2), containers(mainpc, "mainpc")
    result = run_playbook(SITE, "-e", "ai_stack_image_tag=lab-next", check=False)
    assert result.returncode != 0
    assert f"The deployment lock file {LOCK} on ai-lab-pc2 is corrupt (not JSON (13 bytes)" in result.stdout
    assert "break it with -e ai_deploy_lock_break=true" in result.stdout
    assert all(counts["changed"] == 0 for counts in play_recap(result.stdout).values())
    assert (pc2_state(pc2), containers(mainpc, "mainpc")) == before
    assert lock(pc2) == "half a lock {" and lock(mainpc) is None

    broken = run_playbook(SITE, "--limit", "pc2", "-e", "ai_deploy_lock_break=true")
    entry = audit(pc2)[-1]
    assert entry["run_id"] in broken.stdout and entry["lock_broken"] == {"corrupt": "not JSON (13 bytes)"}


def test_a_stale_lock_from_another_controller_needs_the_break_flag(pc2):
    write_lock(pc2, foreign_lock(600))
    young = run_playbook(SITE, "--limit", "pc2", "-e", "ai_deploy_lock_break=true", check=False)
    assert young.returncode != 0
    assert "by bob on controller bobs-laptop (pid 4242), playbook site.yml, limit pc2" in young.stdout
    assert "cannot be broken yet" in young.stdout
    assert json.loads(lock(pc2))["operator"] == "bob"

    write_lock(pc2, foreign_lock(3 * 3600))
    before = pc2_state(pc2)
    plain = run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_image_tag=lab-next", check=False)
    assert plain.returncode != 0
    assert "It is older than 2 h 0 min (ai_deploy_lock_stale_age)" in plain.stdout
    assert pc2_state(pc2) == before and json.loads(lock(pc2))["operator"] == "bob"

    run_playbook(SITE, "--limit", "pc2", "-e", "ai_deploy_lock_break=true")
    assert audit(pc2)[-1]["lock_broken"]["operator"] == "bob"


def test_a_lock_whose_run_is_gone_on_this_controller_can_be_broken_at_once(pc2):
    write_lock(pc2, foreign_lock(30, controller=socket.gethostname(), controller_id=_callback().controller_id(),
                                 process="999999999:1", pid=999999999, operator=OPERATOR))
    plain = run_playbook(SITE, "--limit", "pc2", check=False)
    assert plain.returncode != 0 and "That run is gone (no such process on this controller)" in plain.stdout
    run_playbook(SITE, "--limit", "pc2", "-e", "ai_deploy_lock_break=true")


def test_check_mode_and_drift_check_never_take_nor_wait_for_the_lock(mainpc, pc2, tmp_path):
    held = foreign_lock(5)
    for host in (mainpc, pc2):
        write_lock(host, held)
    assert_check_mode_predicts_no_change(SITE)
    env = {k: v for k, v in os.environ.items() if k != "ANSIBLE_CONFIG"}
    drift = subprocess.run([sys.executable, str(PROJECT_DIR / "scripts" / "drift-check"), "-i",
                            str(PROJECT_DIR / "inventory" / "lab"), "--report", str(tmp_path)],
                           cwd=PROJECT_DIR, env=env, text=True, capture_output=True, check=False)
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert json.loads(lock(mainpc)) == held and json.loads(lock(pc2)) == held
    for host in (mainpc, pc2):
        host.check_output("rm -f %s", LOCK)


def test_manage_stop_is_refused_on_a_locked_host_and_audited_when_it_runs(pc2):
    write_lock(pc2, foreign_lock(60))
    before = pc2_state(pc2)
    refused = run_playbook(MANAGE, "-e", "action=stop", "--limit", "pc2", check=False)
    assert refused.returncode != 0 and "is held by run" in refused.stdout
    assert pc2_state(pc2) == before
    pc2.check_output("rm -f %s", LOCK)

    run_playbook(MANAGE, "-e", "action=stop", "--limit", "pc2")
    try:
        entry = audit(pc2)[-1]
        assert entry["playbook"] == "playbooks/manage.yml" and entry["action"] == "stop" and entry["limit"] == "pc2"
        assert entry["services"] == {name: "stopped" for name in PC2_SERVICES}
    finally:
        run_playbook(SITE, "--limit", "pc2")


def test_history_shows_the_newest_entries_of_both_hosts(pc2):
    result = run_playbook(MANAGE, "-e", "action=history", "-e", "ai_deploy_history_entries=6")
    assert "TIME" in result.stdout and "OPERATOR@CONTROLLER" in result.stdout and "ROLLED BACK" in result.stdout
    assert "playbooks/manage.yml (stop)" in result.stdout
    assert f"{OPERATOR}@{socket.gethostname()}" in result.stdout
    assert all(counts["changed"] == 0 for counts in play_recap(result.stdout).values())
