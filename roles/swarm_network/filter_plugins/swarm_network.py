"""Filters of the swarm_network role: the host firewall's rules as data.

Each rule carries the line `ufw show added` prints for it, so the role reads the firewall
once and adds only the rules it lacks.
"""

from __future__ import annotations


def _rule(proto: str, comment: str, port: int | str | None = None, source: str = "any") -> dict:
    if source == "any":
        added = f"ufw allow {port}/{proto}"
    elif port is None:
        added = f"ufw allow from {source} proto {proto}"
    else:
        added = f"ufw allow from {source} to any port {port} proto {proto}"
    rule = {"from": source, "proto": proto, "comment": comment, "added": f"{added} comment '{comment}'"}
    if port is not None:
        rule["port"] = str(port)
    return rule


def swarm_network_ufw_rules(ssh_port: int, swarm_ports: list[dict], service_ports: list[int],
                            peers: list[str], encrypted: bool = False) -> list[dict]:
    """SSH from anywhere; the swarm's ports, the shared services' ports and (encrypted
    overlay) ESP from each peer only."""
    rules = [_rule("tcp", "ssh", ssh_port)]
    for peer in peers:
        rules += [_rule(p["proto"], "docker swarm", p["port"], peer) for p in swarm_ports]
        if encrypted:
            rules.append(_rule("esp", "docker swarm encrypted overlay", None, peer))
        rules += [_rule("tcp", "ai-system service", port, peer) for port in sorted(set(service_ports))]
    return rules


class FilterModule:
    def filters(self):
        return {"swarm_network_ufw_rules": swarm_network_ufw_rules}
