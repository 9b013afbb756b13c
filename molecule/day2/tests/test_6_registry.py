"""Images from the registry: each pull failure is explained and changes no container; the
air-gapped `load` path still deploys."""

import subprocess

import pytest
from conftest import REGISTRY, PROJECT_DIR, all_healthy, assert_no_secret, containers, health, play_recap, run_playbook

SITE = PROJECT_DIR / "site.yml"
# In the registry, but not on pc2 (the fixture removes it): a rollout to it must pull.
NOT_ON_PC2 = "lab-broken"


def snapshot(pc2):
    return containers(pc2, "pc2"), pc2.file("/opt/ai-system/pc2/compose.yaml").sha256sum


@pytest.fixture(scope="module", autouse=True)
def pc2_without_the_tag(pc2):
    pc2.run("docker image rm %s/ai-system/agent:%s", REGISTRY, NOT_ON_PC2)
    yield
    run_playbook(SITE, "--limit", "pc2")


def assert_refused(pc2, before, result, reason):
    assert result.returncode != 0
    assert f"Could not pull {REGISTRY}/ai-system/agent:" in result.stdout
    assert reason in result.stdout, result.stdout[-3000:]
    assert "No container on this host was changed" in result.stdout
    assert play_recap(result.stdout)["ai-lab-pc2"]["failed"] == 1
    assert snapshot(pc2) == before
    assert health("pc2") == all_healthy("pc2")
    assert_no_secret(result.stdout, result.stderr)


def test_an_unknown_tag_is_refused_and_pc2_keeps_its_containers(pc2):
    before = snapshot(pc2)
    result = run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_image_tag=no-such-tag", check=False)
    assert_refused(pc2, before, result, "The registry does not have this image or tag")


def test_a_wrong_password_is_refused_and_never_shown(pc2):
    before = snapshot(pc2)
    result = run_playbook(SITE, "--limit", "pc2", "-e", f"ai_stack_image_tag={NOT_ON_PC2}",
                          "-e", "ai_stack_image_registry_password=not-the-password", check=False)
    assert_refused(pc2, before, result, "The registry refused the credentials")
    assert "not-the-password" not in result.stdout


def test_an_untrusted_certificate_is_refused(pc2):
    pc2.check_output("mv /etc/docker/certs.d/%s /root/registry-ca.saved", REGISTRY)
    try:
        before = snapshot(pc2)
        result = run_playbook(SITE, "--limit", "pc2", "-e", f"ai_stack_image_tag={NOT_ON_PC2}",
                              "-e", "ai_stack_image_registry_ca_cert=", check=False)
        assert_refused(pc2, before, result, "The registry's TLS certificate is not trusted")
    finally:
        pc2.check_output("mv /root/registry-ca.saved /etc/docker/certs.d/%s", REGISTRY)


def test_the_registry_down_is_refused(pc2):
    subprocess.run(["docker", "stop", REGISTRY.split(":")[0]], check=True, capture_output=True)
    try:
        before = snapshot(pc2)
        result = run_playbook(SITE, "--limit", "pc2", "-e", f"ai_stack_image_tag={NOT_ON_PC2}", check=False)
        assert_refused(pc2, before, result, "The registry does not answer")
    finally:
        subprocess.run(["docker", "start", REGISTRY.split(":")[0]], check=True, capture_output=True)


def test_the_air_gapped_load_path_still_deploys(pc2):
    result = run_playbook(SITE, "--limit", "pc2", "-e", "ai_stack_image_source=load",
                          "-e", "ai_stack_image=ai-system/agent:lab-next")
    assert "Load the images" in result.stdout
    images = set(pc2.check_output("docker ps --filter label=com.docker.compose.project=pc2 --format '{{.Image}}'").split())
    assert images == {"ai-system/agent:lab-next"}
    assert health("pc2", wait=60) == all_healthy("pc2")
