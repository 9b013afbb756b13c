"""--limit pc2 rollouts: MainPC untouched; an unhealthy tag is rolled back."""

import re

import pytest
from conftest import (REGISTRY, PROJECT_DIR, all_healthy, assert_no_secret, catalogue, containers, health, play_recap,
                      run_playbook)

SITE = PROJECT_DIR / "site.yml"


def images(host):
    return set(host.check_output("docker ps --filter label=com.docker.compose.project=pc2 "
                                 "--format '{{.Image}}'").split())


@pytest.fixture(scope="module", autouse=True)
def back_to_the_lab_tag():
    yield
    run_playbook(SITE, "--limit", "pc2")


def test_limit_pc2_rollout_changes_pc2_only(mainpc, pc2):
    mainpc_before, pc2_before = containers(mainpc, "mainpc"), containers(pc2, "pc2")
    result = run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_image_tag=lab-next")
    assert set(play_recap(result.stdout)) == {"ai-lab-pc2"}
    # Tasks delegated to MainPC only read (swarm tokens, registry health).
    assert not re.search(r"changed: \[ai-lab-pc2 -> ai-lab-mainpc\]", result.stdout)
    assert containers(mainpc, "mainpc") == mainpc_before
    assert images(pc2) == {f"{REGISTRY}/ai-system/agent:lab-next"}
    assert set(containers(pc2, "pc2").values()).isdisjoint(pc2_before.values())
    assert health("pc2") == all_healthy("pc2")
    # This run logged in to the registry and pulled: no secret in its output.
    assert "Log in to the registry" in result.stdout
    assert_no_secret(result.stdout, result.stderr)


def test_a_tag_that_never_gets_healthy_is_rolled_back(mainpc, pc2):
    mainpc_before = containers(mainpc, "mainpc")
    result = run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_image_tag=lab-broken",
                          "-e", "ai_stack_health_wait_timeout=20", check=False)
    assert result.returncode != 0
    assert "pc2 on ai-lab-pc2 failed its deploy" in result.stdout
    assert "advanced-router: bad_reply" in result.stdout
    count = len(catalogue("pc2"))
    assert f"Rolled back to the last good deployment: {count} of {count} services healthy again" in result.stdout
    assert images(pc2) == {f"{REGISTRY}/ai-system/agent:lab-next"}
    assert health("pc2") == all_healthy("pc2")
    assert f"{REGISTRY}/ai-system/agent:lab-next" in pc2.file("/opt/ai-system/pc2/last-good/compose.yaml").content_string
    assert containers(mainpc, "mainpc") == mainpc_before
