"""roles/nvidia_container_toolkit on the lab's GPU host (stand-in driver)."""

import json

from conftest import assert_check_mode_predicts_no_change, run_playbook


def test_repository_file_is_deb822_and_signed(mainpc):
    repo = mainpc.file("/etc/apt/sources.list.d/nvidia-container-toolkit.sources")
    assert repo.exists
    text = repo.content_string
    assert "Suites: /" in text
    assert "Signed-By: /usr/share/keyrings/lab-nvidia.gpg" in text


def test_runtime_registered_next_to_docker_engines_keys(mainpc):
    daemon = json.loads(mainpc.file("/etc/docker/daemon.json").content_string)
    assert daemon["runtimes"]["nvidia"]["path"] == "/usr/local/bin/nvidia-container-runtime"
    assert daemon["log-opts"]["max-size"] == "10m"
    assert "default-runtime" not in daemon


def test_engine_lists_the_nvidia_runtime(mainpc):
    runtimes = json.loads(mainpc.check_output("docker info --format '{{json .Runtimes}}'"))
    assert "nvidia" in runtimes


def test_the_gpu_loss_guard_is_in_place_once(mainpc):
    # legacy mode: NVIDIA's /dev/char symlinks by a udev rule, and made once now.
    rule = mainpc.file("/etc/udev/rules.d/71-nvidia-dev-char.rules").content_string
    assert 'DEVPATH=="/bus/pci/drivers/nvidia"' in rule
    assert 'RUN+="/usr/local/bin/nvidia-ctk system create-dev-char-symlinks --create-all"' in rule
    calls = mainpc.file("/var/log/nvidia-ctk-standin.log").content_string.splitlines()
    # Once, although the idempotence step converged again.
    assert calls.count("system create-dev-char-symlinks --create-all") == 1


def test_cdi_mode_generates_the_spec_and_turns_on_the_engines_cdi_feature(mainpc, scenario_dir):
    mainpc.check_output("rm -f /etc/cdi/nvidia.yaml && mkdir -p /etc/cdi")
    run_playbook(scenario_dir / "converge.yml", "-e", '{"nvidia_container_toolkit_mode": "cdi"}')
    assert "kind: nvidia.com/gpu" in mainpc.file("/etc/cdi/nvidia.yaml").content_string
    assert json.loads(mainpc.file("/etc/docker/daemon.json").content_string)["features"] == {"cdi": True}
    again = run_playbook(scenario_dir / "converge.yml", "-e", '{"nvidia_container_toolkit_mode": "cdi"}')
    assert " changed=0 " in again.stdout.split("PLAY RECAP")[-1], again.stdout[-3000:]


def test_pc2_is_not_a_gpu_host(pc2):
    assert not pc2.file("/etc/apt/sources.list.d/nvidia-container-toolkit.sources").exists


def test_preflight_without_driver(mainpc, scenario_dir):
    daemon_before = mainpc.file("/etc/docker/daemon.json").content_string
    mainpc.check_output("mv /usr/local/bin/nvidia-smi /usr/local/bin/nvidia-smi.away")
    try:
        required = run_playbook(scenario_dir / "converge.yml", check=False)
        assert required.returncode != 0
        assert "nvidia-smi does not answer" in required.stdout
        assert "nvidia_gpu_required: false" in required.stdout
        optional = run_playbook(scenario_dir / "converge.yml", "-e", '{"nvidia_gpu_required": false}')
        assert "WARNING: no NVIDIA driver on ai-lab-mainpc" in optional.stdout
    finally:
        mainpc.check_output("mv /usr/local/bin/nvidia-smi.away /usr/local/bin/nvidia-smi")
    # Without a driver the role touches nothing: the runtime entry stays as it was.
    assert mainpc.file("/etc/docker/daemon.json").content_string == daemon_before


def test_check_mode_after_converge_predicts_no_change(scenario_dir):
    assert_check_mode_predicts_no_change(scenario_dir / "converge.yml")
