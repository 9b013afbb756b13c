"""Filters of the nvidia_container_toolkit role: what apt must do for the pinned packages."""

from __future__ import annotations

from typing import Any


def nvidia_container_toolkit_plan(dpkg_lines: list[str], packages: list[str], versions: dict[str, Any] | None,
                                  upgrade: bool = False) -> dict:
    """From `dpkg-query --showformat '${db:Status-Abbrev} ${Package} ${Version}'`: ``install``, the
    apt names (``name=version`` where pinned) of the packages to install: the missing ones, and
    with ``upgrade`` also those whose pinned version differs; ``drift_text``, the differing
    pins for a warning; ``unheld``, installed packages not on hold."""
    versions = {str(k): str(v) for k, v in (versions or {}).items() if str(v)}
    installed = {f[1]: (f[0][0] == "h", f[2]) for f in (line.split() for line in dpkg_lines)
                 if len(f) >= 3 and len(f[0]) >= 2 and f[0][1] == "i"}
    drift = {p: v for p, v in versions.items() if p in packages and p in installed and installed[p][1] != v}
    wanted = [p for p in packages if p not in installed or (upgrade and p in drift)]
    return {
        "install": [f"{p}={versions[p]}" if p in versions else p for p in wanted],
        "drift_text": "; ".join(f"{p} {installed[p][1]} installed, {v} pinned" for p, v in drift.items()),
        "unheld": [p for p in packages if p in installed and not installed[p][0]],
    }


class FilterModule:
    def filters(self):
        return {"nvidia_container_toolkit_plan": nvidia_container_toolkit_plan}
