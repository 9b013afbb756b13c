"""roles/swarm_network/filter_plugins: the host firewall's rules."""

import importlib.util
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("swarm_network_filters",
                                               PROJECT / "roles/swarm_network/filter_plugins/swarm_network.py")
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)

SWARM_PORTS = [{"port": "2377", "proto": "tcp"}, {"port": "7946", "proto": "tcp"},
               {"port": "7946", "proto": "udp"}, {"port": "4789", "proto": "udp"}]


def rules(**kwargs):
    args = {"ssh_port": 22, "swarm_ports": SWARM_PORTS, "service_ports": [5780], "peers": ["192.168.100.16"]}
    return filters.swarm_network_ufw_rules(**{**args, **kwargs})


def test_ssh_from_anywhere_the_rest_from_peers_only():
    added = [r["added"] for r in rules()]
    assert added[0] == "ufw allow 22/tcp comment 'ssh'"
    assert "ufw allow from 192.168.100.16 to any port 4789 proto udp comment 'docker swarm'" in added
    assert "ufw allow from 192.168.100.16 to any port 5780 proto tcp comment 'ai-system service'" in added
    assert all(r["from"] == "192.168.100.16" for r in rules()[1:])


def test_an_encrypted_overlay_gets_esp_from_each_peer():
    # Without ESP, swarm_network_encrypted and the firewall together would drop the overlay.
    assert not [r for r in rules() if r["proto"] == "esp"]
    esp = [r for r in rules(encrypted=True, peers=["10.0.0.2", "10.0.0.3"]) if r["proto"] == "esp"]
    assert [r["added"] for r in esp] == [
        "ufw allow from 10.0.0.2 proto esp comment 'docker swarm encrypted overlay'",
        "ufw allow from 10.0.0.3 proto esp comment 'docker swarm encrypted overlay'"]
    assert all("port" not in r for r in esp)


def test_one_port_per_rule_even_when_listed_twice():
    assert len([r for r in rules(service_ports=[5780, 5780]) if r["comment"] == "ai-system service"]) == 1
