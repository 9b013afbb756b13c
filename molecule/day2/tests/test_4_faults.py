"""Faults: the registry down during a PC2 rollout, an engine restart, a host restart."""

import subprocess

from conftest import PROJECT_DIR, all_healthy, containers, health, play_recap, run_playbook

# Every service of both machines (health() probes them all).
ALL_HEALTHY = all_healthy()


def test_pc2_rollout_stops_before_changing_pc2_when_the_registry_is_down(mainpc, pc2):
    mainpc.check_output("docker stop system-digital-twin")
    try:
        before = containers(pc2, "pc2"), pc2.file("/opt/ai-system/pc2/compose.yaml").sha256sum
        result = run_playbook(PROJECT_DIR / "site.yml", "--limit", "pc2", "-e", "ai_stack_image_tag=lab-next", check=False)
        assert result.returncode != 0
        assert "MainPC's system-digital-twin on ai-lab-mainpc is not healthy" in result.stdout
        assert "nothing was changed here" in result.stdout
        assert play_recap(result.stdout)["ai-lab-pc2"]["changed"] == 0
        assert (containers(pc2, "pc2"), pc2.file("/opt/ai-system/pc2/compose.yaml").sha256sum) == before
    finally:
        mainpc.check_output("docker start system-digital-twin")
    assert health(wait=90) == ALL_HEALTHY


def test_services_come_back_after_the_engine_restarts(pc2):
    pc2.check_output("systemctl restart docker")
    assert health(wait=120) == ALL_HEALTHY


def test_services_come_back_after_the_host_restarts(pc2):
    subprocess.run(["docker", "restart", "ai-lab-pc2"], check=True, capture_output=True)
    assert health(wait=180) == ALL_HEALTHY
