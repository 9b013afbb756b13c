"""Filters of the docker_engine role: the engine's packages as dpkg shows them."""

from __future__ import annotations

from typing import Any


def docker_engine_packages_state(dpkg_lines: list[str], packages: list[str], core: list[str],
                                 versions: dict[str, Any] | None = None) -> dict:
    """What the packages need, from `dpkg-query --showformat '${db:Status-Abbrev} ${Package} ${Version}'`.

    Returns ``installed`` ({package: {held, version}}), ``missing`` (to install), ``apt_names``
    (the missing ones as apt names, ``name=version`` where a version is pinned),
    ``version_drift`` ({package: [installed, pinned]} of installed packages whose pinned version
    differs), ``upgrade_names`` (them as ``name=version``), ``drift_text`` (for a message) and
    ``unheld`` (installed core packages not on hold).
    """
    versions = {str(k): str(v) for k, v in (versions or {}).items() if str(v)}
    installed = {}
    for line in dpkg_lines:
        fields = line.split()
        # Status-Abbrev: desired action (h: hold), then status (i: installed), then error flag.
        if len(fields) >= 3 and len(fields[0]) >= 2 and fields[0][1] == "i":
            installed[fields[1]] = {"held": fields[0][0] == "h", "version": fields[2]}
    missing = [p for p in packages if p not in installed]
    drift = {p: [installed[p]["version"], v] for p, v in versions.items() if p in installed and installed[p]["version"] != v}
    return {
        "installed": installed,
        "missing": missing,
        "apt_names": [f"{p}={versions[p]}" if p in versions else p for p in missing],
        "version_drift": drift,
        "upgrade_names": [f"{p}={pinned}" for p, (_, pinned) in drift.items()],
        "drift_text": "; ".join(f"{p} {now} installed, {pinned} pinned" for p, (now, pinned) in drift.items()),
        "unheld": [p for p in core if p in installed and not installed[p]["held"]],
    }


class FilterModule:
    def filters(self):
        return {"docker_engine_packages_state": docker_engine_packages_state}
