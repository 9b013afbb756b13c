"""scripts/gpu-proof on a lab host: the lab has no GPU, so the proof must fail at its first
check, say why in its table, and leave nothing behind. (On the real GPU host it runs every
check; that part needs hardware and is documented in the README.)"""

import subprocess

from conftest import PROJECT_DIR


def test_gpu_proof_fails_clearly_without_a_gpu(mainpc):
    # Not /tmp: docker cp cannot write into the lab host's tmpfs mounts.
    subprocess.run(["docker", "cp", str(PROJECT_DIR / "scripts" / "gpu-proof"), "ai-lab-mainpc:/var/tmp/gpu-proof"], check=True)
    result = mainpc.run("python3 /var/tmp/gpu-proof")
    mainpc.run("rm -f /var/tmp/gpu-proof")
    assert result.rc == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL  driver answers on the host (nvidia-smi -L)")
    assert lines[-1] == "gpu-proof: FAILED (0/1)"
    assert mainpc.run("docker inspect ai-gpu-proof").rc != 0
