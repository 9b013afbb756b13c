"""A GPU service that lost its GPU is reported and fails the gate (issue 14).

The lab has no GPU, so its GPU services' containers are exactly containers without their
GPU: with the GPU checks on (`nvidia_gpu_required` and `ai_stack_gpu_reservations`, as on the
real MainPC), the probe must find that `nvidia-smi -L` fails inside them, while they still
answer over ZMQ. A real GPU that stays visible is scripts/gpu-proof's part, on the hardware.
"""

import re

from conftest import PROJECT_DIR, containers, run_playbook, services

MANAGE = PROJECT_DIR / "playbooks" / "manage.yml"
GPU_CHECKS = ("-e", "nvidia_gpu_required=true", "-e", "ai_stack_gpu_reservations=true")
GPU_SERVICES = sorted(entry["name"] for entry in services("mainpc") if entry.get("gpu"))


def states(output: str) -> dict[str, str]:
    """{service: state} from the health table (HOST SERVICE STATE LATENCY rows)."""
    return dict(re.findall(r'"ai-lab-mainpc\s+(\S+)\s+(\S+)\s+', output))


def test_status_reports_gpu_services_without_their_gpu_as_gpu_lost():
    assert GPU_SERVICES, "the lab's MainPC catalogue has GPU services"
    result = run_playbook(MANAGE, "-e", "action=status", "--limit", "mainpc", *GPU_CHECKS)
    found = states(result.stdout)
    assert sorted(name for name, state in found.items() if state == "gpu_lost") == GPU_SERVICES, result.stdout[-3000:]
    assert {state for name, state in found.items() if name not in GPU_SERVICES} == {"healthy"}

    # Without the GPU checks (the lab's settings), the same containers are healthy.
    plain = states(run_playbook(MANAGE, "-e", "action=status", "--limit", "mainpc").stdout)
    assert set(plain.values()) == {"healthy"} and set(plain) == set(found)


def test_the_health_gate_fails_on_a_service_that_lost_its_gpu(mainpc, tmp_path):
    before = containers(mainpc, "mainpc")
    playbook = tmp_path / "gate.yml"
    # The deploy's own gate (roles/ai_stack/tasks/health.yml with the gate on), alone.
    playbook.write_text(f"""
- name: The deploy's health gate on MainPC
  hosts: mainpc
  gather_facts: false
  tasks:
    - name: Run the gate
      ansible.builtin.include_role:
        name: ai_stack
        tasks_from: health
      vars:
        ai_stack_check_as: gate_result
        ai_stack_check_gate: true
""")
    result = run_playbook(playbook, "-i", str(PROJECT_DIR / "inventory" / "lab"), *GPU_CHECKS, check=False)
    assert result.returncode != 0
    message = next((line for line in result.stdout.splitlines() if "see no GPU" in line), "")
    assert all(name in message for name in GPU_SERVICES), result.stdout[-3000:]
    assert "scripts/gpu-proof" in message
    assert containers(mainpc, "mainpc") == before
