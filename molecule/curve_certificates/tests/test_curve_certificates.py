"""roles/curve_certificates on the lab hosts."""

from conftest import PROJECT_DIR, assert_check_mode_predicts_no_change, play_recap, run_playbook, secret_keys

HOST_DIR = "/etc/ai-system/certificates"
LOAD = "python3 -c 'import sys, zmq.auth; print(zmq.auth.load_certificate(sys.argv[1])[0].decode())' {}"


def public_key(host, path):
    return host.check_output(LOAD.format(path))


def test_controller_holds_the_pairs_and_git_ignores_the_secrets():
    for name in ("server", "client", "health-probe"):
        assert (PROJECT_DIR / "certificates" / f"{name}.key").is_file()
        secret = PROJECT_DIR / "certificates" / f"{name}.key_secret"
        assert secret.stat().st_mode & 0o777 == 0o600


def test_host_files_owners_and_modes(host):
    directory = host.file(HOST_DIR)
    assert directory.mode == 0o700 and directory.uid == 10001
    for name in ("server.key", "client.key", "health-probe.key"):
        public = host.file(f"{HOST_DIR}/{name}")
        assert public.mode == 0o644 and public.uid == 10001
    for name in ("server.key_secret", "client.key_secret"):
        secret = host.file(f"{HOST_DIR}/{name}")
        assert secret.mode == 0o600 and secret.uid == 10001
    assert not host.file(f"{HOST_DIR}/health-probe.key_secret").exists  # the probe's secret is not the agents'
    probe = host.file("/etc/ai-system/health-probe")
    assert probe.mode == 0o700 and probe.user == "root"
    assert host.file("/etc/ai-system/health-probe/client.key_secret").mode == 0o600


def test_host_keys_load_and_match_the_controller(host):
    controller = (PROJECT_DIR / "certificates" / "server.key").read_text()
    assert host.file(f"{HOST_DIR}/server.key").content_string == controller
    server = public_key(host, f"{HOST_DIR}/server.key_secret")
    assert public_key(host, "/etc/ai-system/health-probe/server.key") == server
    assert public_key(host, "/etc/ai-system/health-probe/client.key_secret") == \
        public_key(host, f"{HOST_DIR}/health-probe.key")


def test_check_mode_after_converge_predicts_no_change(scenario_dir):
    assert_check_mode_predicts_no_change(scenario_dir / "converge.yml")


def test_rotation_makes_and_distributes_new_pairs_without_printing_them(mainpc, pc2, scenario_dir):
    before = public_key(mainpc, f"{HOST_DIR}/server.key")
    rotated = run_playbook(scenario_dir / "converge.yml", "--diff", "-v", "-e", "curve_certificates_rotate=true")
    after = public_key(mainpc, f"{HOST_DIR}/server.key")
    assert after != before
    assert public_key(pc2, f"{HOST_DIR}/server.key") == after
    keys = secret_keys()
    assert len(keys) == 3
    for key in keys:
        assert key not in rotated.stdout and key not in rotated.stderr
    # And the next ordinary run keeps the new pairs.
    again = run_playbook(scenario_dir / "converge.yml")
    assert all(counts["changed"] == 0 for counts in play_recap(again.stdout).values())
