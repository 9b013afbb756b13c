"""playbooks/upgrade.yml: pinned package versions are applied one host at a time, through the
health gate; site.yml never changes a held package's version, it warns. The lab's mirror has one
version of each package, so the upgrade itself runs with the installed versions pinned (nothing
to change, nothing restarted); a differing pin shows site.yml's refusal."""

import json

from conftest import PROJECT_DIR, all_healthy, containers, health, play_recap, run_playbook

UPGRADE = PROJECT_DIR / "playbooks" / "upgrade.yml"


def engine_started_at(host):
    return host.check_output("systemctl show docker --property ActiveEnterTimestampMonotonic")


def test_upgrade_to_the_installed_versions_changes_nothing_and_checks_health(mainpc, pc2):
    pins = {"docker_engine_versions": {"docker.io": mainpc.check_output("dpkg-query --show --showformat '${Version}' docker.io")}}
    before = [engine_started_at(h) for h in (mainpc, pc2)], containers(mainpc, "mainpc"), containers(pc2, "pc2")
    predicted = run_playbook(UPGRADE, "--check", "-e", json.dumps(pins))
    assert all(c["changed"] == 0 for c in play_recap(predicted.stdout).values()), predicted.stdout[-3000:]
    result = run_playbook(UPGRADE, "-e", json.dumps(pins))
    recap = play_recap(result.stdout)
    assert set(recap) == {"ai-lab-mainpc", "ai-lab-pc2"} and all(c["changed"] == 0 for c in recap.values())
    # One host at a time: a play batch per host, MainPC first.
    batches = [line for line in result.stdout.splitlines() if line.startswith("PLAY [Upgrade the pinned packages")]
    assert len(batches) == 2
    assert "Check the services over CURVE" in result.stdout
    assert ([engine_started_at(h) for h in (mainpc, pc2)], containers(mainpc, "mainpc"), containers(pc2, "pc2")) == before
    assert health() == all_healthy()


def test_site_yml_warns_about_a_differing_pin_and_changes_nothing(mainpc, pc2):
    before = engine_started_at(pc2), containers(pc2, "pc2")
    pins = {"docker_engine_versions": {"docker.io": "0.0.1-not-this-one"}}
    result = run_playbook(PROJECT_DIR / "site.yml", "--limit", "pc2", "-e", json.dumps(pins))
    assert all(c["changed"] == 0 for c in play_recap(result.stdout).values()), result.stdout[-3000:]
    assert "0.0.1-not-this-one pinned" in result.stdout and "run playbooks/upgrade.yml" in result.stdout
    assert (engine_started_at(pc2), containers(pc2, "pc2")) == before
