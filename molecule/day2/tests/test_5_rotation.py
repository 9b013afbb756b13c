"""Key rotation: new pairs everywhere, the old client key refused, the new keys accepted."""

from conftest import PROJECT_DIR, run_playbook, secret_keys


def test_rotate_keys(mainpc):
    server_before = (PROJECT_DIR / "certificates" / "server.key").read_text()
    old_secrets = secret_keys()
    result = run_playbook(PROJECT_DIR / "playbooks" / "rotate-keys.yml", "--diff")
    assert (PROJECT_DIR / "certificates" / "server.key").read_text() != server_before
    assert mainpc.file("/etc/ai-system/certificates/server.key").content_string != server_before
    assert "services refuse the old client key (auth_failed)" in result.stdout
    assert "Check that every service accepts the new keys" in result.stdout
    for key in old_secrets + secret_keys():
        assert key not in result.stdout
    assert not (PROJECT_DIR / ".cache" / "rotation" / "client-old.key_secret").exists()
