"""Release history and rollback on request (roles/ai_stack tasks/releases.yml, prune.yml,
playbooks/rollback.yml): the newest N healthy releases are kept per host, `rollback.yml
-e release=previous` redeploys one through the health gate and the next site.yml brings the
inventory's release back, unknown ids and a count of 0 are refused without a change, and the
images no kept release references are pruned while the others stay.

The tests run in order on PC2 (--limit pc2), each building on the previous one:
lab-next, then lab with an extra variable in the env file, then lab, with 2 releases kept."""

import json
import re

import pytest
from conftest import REGISTRY, PROJECT_DIR, all_healthy, containers, health, play_recap, run_playbook

SITE = PROJECT_DIR / "site.yml"
ROLLBACK = PROJECT_DIR / "playbooks" / "rollback.yml"
RELEASES = "/opt/ai-system/pc2/releases"
AUDIT = "/var/log/ai-system/deployments.jsonl"
AGENT = f"{REGISTRY}/ai-system/agent"
EXTRA_ENV = {"ai_stack_extra_env": {"RELEASE_TEST": "1"}, "ai_stack_releases_keep": 2}
RELEASE_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")


def index(host):
    return json.loads(host.file(f"{RELEASES}/index.json").content_string)


def release_dirs(host):
    return sorted(host.check_output(f"find {RELEASES} -mindepth 1 -maxdepth 1 -type d -printf '%f\\n'").split())


def running_images(host):
    return set(host.check_output("docker ps --filter label=com.docker.compose.project=pc2 "
                                 "--format '{{.Image}}'").split())


def has_image(host, ref):
    return host.run("docker image inspect %s", ref).rc == 0


def release_test_env(host):
    """RELEASE_TEST of every PC2 container ('' when not set)."""
    found = {}
    for name in containers(host, "pc2"):
        env = json.loads(host.check_output("docker inspect --format '{{json .Config.Env}}' %s", name))
        found[name] = next((e.split("=", 1)[1] for e in env if e.startswith("RELEASE_TEST=")), "")
    return found


def pc2_changed(result):
    return play_recap(result.stdout)["ai-lab-pc2"]["changed"]


@pytest.fixture(scope="module", autouse=True)
def back_to_the_inventory():
    yield
    run_playbook(SITE, "--limit", "pc2")


def test_the_newest_releases_are_kept_and_unreferenced_images_pruned(pc2):
    run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_image_tag=lab-next", "-e", "ai_stack_releases_keep=2")
    first = index(pc2)
    next_release = first["current"]
    assert list(next(r for r in first["releases"] if r["id"] == next_release)["images"]) == [f"{AGENT}:lab-next"]

    run_playbook(SITE, "--limit", "pc2", "-e", json.dumps(EXTRA_ENV))
    assert set(release_test_env(pc2).values()) == {"1"}
    run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_releases_keep=2")

    history = index(pc2)
    ids = [r["id"] for r in history["releases"]]
    # Two kept, oldest first, sortable ids; lab-next's release is gone, the current one is lab's.
    assert len(ids) == 2 and ids == sorted(ids) and all(RELEASE_ID.match(i) for i in ids), history
    assert next_release not in ids
    assert history["current"] == ids[-1]
    assert [list(r["images"]) for r in history["releases"]] == [[f"{AGENT}:lab"], [f"{AGENT}:lab"]]
    # The image references carry their registry digests (pulled from the lab's registry).
    assert all(d.startswith("sha256:") for r in history["releases"] for d in r["images"].values())
    assert release_dirs(pc2) == ids
    for release in ids:
        for name in ("compose.yaml", "env.pc2", "manifest.json"):
            assert pc2.file(f"{RELEASES}/{release}/{name}").exists, (release, name)
        assert json.loads(pc2.file(f"{RELEASES}/{release}/manifest.json").content_string)["id"] == release
    # last-good is the newest healthy release (the automatic rollback's target).
    assert pc2.file("/opt/ai-system/pc2/last-good/compose.yaml").sha256sum == \
        pc2.file(f"{RELEASES}/{ids[-1]}/compose.yaml").sha256sum
    assert "RELEASE_TEST" in pc2.file(f"{RELEASES}/{ids[0]}/env.pc2").content_string
    # Pruned: lab-next (no kept release references it); kept: lab and the network anchor.
    assert not has_image(pc2, f"{AGENT}:lab-next")
    assert has_image(pc2, f"{AGENT}:lab")
    assert pc2.check_output("docker image ls -q ai-system/network-anchor")


def test_rollback_to_the_previous_release_and_site_brings_the_inventory_back(mainpc, pc2):
    before = index(pc2)
    previous, current = before["releases"][0]["id"], before["current"]
    mainpc_before, pc2_before = containers(mainpc, "mainpc"), containers(pc2, "pc2")

    # Check mode predicts the redeploy and changes nothing.
    predicted = run_playbook(ROLLBACK, "--check", "-e", "release=previous", "--limit", "pc2")
    assert pc2_changed(predicted) > 0
    assert index(pc2) == before and containers(pc2, "pc2") == pc2_before

    result = run_playbook(ROLLBACK, "-e", "release=previous", "--limit", "pc2")
    assert set(play_recap(result.stdout)) == {"ai-lab-pc2"}
    assert f"release {previous}" in result.stdout and "Check the services over CURVE" in result.stdout
    assert containers(mainpc, "mainpc") == mainpc_before
    assert set(release_test_env(pc2).values()) == {"1"}
    assert health("pc2") == all_healthy("pc2")
    after = index(pc2)
    assert after["current"] == previous and after["releases"] == before["releases"]
    assert pc2.file("/opt/ai-system/pc2/last-good/compose.yaml").sha256sum == \
        pc2.file(f"{RELEASES}/{previous}/compose.yaml").sha256sum
    entry = json.loads(pc2.file(AUDIT).content_string.splitlines()[-1])
    assert entry["action"] == "rollback" and entry["result"] == "success" and entry["playbook"].endswith("rollback.yml"), entry

    # The next site.yml deploys the inventory's release again: no new release.
    run_playbook(SITE, "--limit", "pc2")
    assert set(release_test_env(pc2).values()) == {""}
    assert index(pc2) == dict(before, current=current)
    assert health("pc2") == all_healthy("pc2")

    # Idempotent: nothing changes, no release is made.
    again = run_playbook(SITE, "--limit", "pc2")
    assert pc2_changed(again) == 0, again.stdout[-3000:]
    assert index(pc2) == dict(before, current=current)


@pytest.mark.parametrize(("playbook", "args", "expected"), [
    (ROLLBACK, ["-e", "release=20990101T000000Z-000000000000"],
     "Release 20990101T000000Z-000000000000 does not exist on ai-lab-pc2"),
    (ROLLBACK, ["-e", "release=previous", "-e", "ai_stack_releases_keep=0"], "ai_stack_releases_keep must be at least 1"),
    (SITE, ["-e", "ai_stack_releases_keep=0"], "ai_stack_releases_keep must be at least 1"),
], ids=["unknown-release", "rollback-count-0", "site-count-0"])
def test_bad_inputs_are_refused_and_change_nothing(pc2, playbook, args, expected):
    before = (index(pc2), release_dirs(pc2), containers(pc2, "pc2"),
              pc2.file("/opt/ai-system/pc2/last-good/compose.yaml").sha256sum)
    result = run_playbook(playbook, "--limit", "pc2", *args, check=False)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout[-3000:]
    assert pc2_changed(result) == 0
    assert (index(pc2), release_dirs(pc2), containers(pc2, "pc2"),
            pc2.file("/opt/ai-system/pc2/last-good/compose.yaml").sha256sum) == before
