"""Filters of the curve_certificates role."""

from __future__ import annotations


def curve_certificates_in_place(find_result: dict) -> dict:
    """{path: {'checksum', 'mode', 'owners'}} of the files an ansible.builtin.find found.

    Lets the role copy only the key files whose content, mode or owner differ, with one
    remote call instead of one per file.
    """
    return {
        f["path"]: {"checksum": f.get("checksum"), "mode": f.get("mode"),
                    "owners": [str(f.get("uid")), f.get("pw_name")]}
        for f in (find_result or {}).get("files", [])
    }


class FilterModule:
    def filters(self):
        return {"curve_certificates_in_place": curve_certificates_in_place}
