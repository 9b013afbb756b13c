"""Filters of the curve_certificates role.

Key files are compared without ever reading a secret key: public keys by fingerprint (the
first 16 hex digits of the sha256 of the Z85 public key), secret files by their sha1
checksum (as ``ansible.builtin.find`` gives it). Nothing these filters return or put in a
message holds secret key material.
"""

from __future__ import annotations

import hashlib
import os
import re

PUBLIC_KEY_LINE = re.compile(rb'^\s*public-key\s*=\s*"([^"]*)"', re.MULTILINE)
SECRET_KEY_LINE = re.compile(rb'^\s*secret-key\s*=\s*"[^"]{40}"', re.MULTILINE)
GREP_LINE = re.compile(r'^(?P<path>.*?):\s*public-key\s*=\s*"(?P<key>[^"]*)"')

RECOVER = "ansible-playbook playbooks/recover-keys.yml"
ROTATE = "ansible-playbook playbooks/rotate-keys.yml"


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


def curve_certificates_fingerprint(public_key) -> str:
    """Short fingerprint of a Z85 public key: the first 16 hex digits of its sha256."""
    if isinstance(public_key, bytes):
        public_key = public_key.decode("ascii", "replace")
    return hashlib.sha256(str(public_key).encode("utf-8")).hexdigest()[:16]


def curve_certificates_layout(pairs, probe_name, certificates_dir, probe_dir, owner, group) -> list:
    """Every key file the role puts on a host: [{src, dest, mode, owner, group, secret}].

    src is the file's name in the controller's directory, dest its path on the host. The
    role distributes exactly these files, and recover-keys.yml maps them back.
    """
    names = list(pairs) + [probe_name]
    files = [dict(src=f"{n}.key", dest=os.path.join(certificates_dir, f"{n}.key"), mode="0644",
                  owner=str(owner), group=str(group), secret=False) for n in names]
    files += [dict(src=f"{n}.key_secret", dest=os.path.join(certificates_dir, f"{n}.key_secret"), mode="0600",
                   owner=str(owner), group=str(group), secret=True) for n in pairs]
    files += [
        dict(src=f"{probe_name}.key", dest=os.path.join(probe_dir, "client.key"), mode="0644",
             owner="root", group="root", secret=False),
        dict(src=f"{probe_name}.key_secret", dest=os.path.join(probe_dir, "client.key_secret"), mode="0600",
             owner="root", group="root", secret=True),
        dict(src="server.key", dest=os.path.join(probe_dir, "server.key"), mode="0644",
             owner="root", group="root", secret=False),
    ]
    return files


def curve_certificates_host_keys(find_result: dict, layout: list) -> dict:
    """{src: [{'path', 'checksum', 'rank'}]}: the role's key files a host holds, by controller name.

    rank is the file's place in the layout (the certificate directory's copies come first).
    """
    found = curve_certificates_in_place(find_result)
    held: dict = {}
    for rank, entry in enumerate(layout):
        if entry["dest"] in found:
            held.setdefault(entry["src"], []).append({"path": entry["dest"], "checksum": found[entry["dest"]]["checksum"],
                                                      "rank": rank})
    return held


def _public_key_of(data: bytes):
    match = PUBLIC_KEY_LINE.search(data)
    return match.group(1).decode("ascii", "replace") if match else None


def curve_certificates_controller_keys(directory: str, names) -> dict:
    """What the controller's directory holds, read on the controller.

    {'dir', 'files': {'NAME.key': {'sha1', 'fingerprint', 'mode'}, 'NAME.key_secret': {...}},
     'problems': [...], 'complete': bool}. The fingerprint of a secret file is that of the
    public key written next to its secret; the secret key itself is never looked at, only
    whether a line holds one. A problem is a pair the role cannot use as it is: half present,
    or its two files holding different public keys. ``complete`` says that every pair is
    there, usable and with its modes (0644, 0600): the role then has no pair to make or mend.
    """
    files: dict = {}
    problems: list = []
    for name in names:
        public, secret = f"{name}.key", f"{name}.key_secret"
        for fname in (public, secret):
            path = os.path.join(directory, fname)
            if not os.path.lexists(path):
                continue
            if os.path.islink(path) or not os.path.isfile(path):
                problems.append(f"{fname} is not a regular file")
                continue
            with open(path, "rb") as handle:
                data = handle.read()
            key = _public_key_of(data)
            files[fname] = {"sha1": hashlib.sha1(data).hexdigest(),  # noqa: S324 - find's checksum
                            "fingerprint": curve_certificates_fingerprint(key) if key else None,
                            "mode": "%04o" % (os.stat(path).st_mode & 0o7777)}
            if key is None:
                problems.append(f"{fname} holds no public key")
            elif fname == secret and not SECRET_KEY_LINE.search(data):
                problems.append(f"{fname} holds no secret key")
        present = [f for f in (public, secret) if os.path.lexists(os.path.join(directory, f))]
        if present == [public]:
            problems.append(f"{public} is there without its secret half {secret}")
        elif present == [secret]:
            problems.append(f"{secret} is there without its public half {public}")
        elif (public in files and secret in files and files[public]["fingerprint"] and files[secret]["fingerprint"]
              and files[public]["fingerprint"] != files[secret]["fingerprint"]):
            problems.append(f"{public} ({files[public]['fingerprint']}) and {secret} "
                            f"({files[secret]['fingerprint']}) hold different public keys")
    complete = not problems and all(
        files.get(f, {}).get("mode") == mode
        for name in names for f, mode in ((f"{name}.key", "0644"), (f"{name}.key_secret", "0600")))
    return {"dir": directory, "files": files, "problems": problems, "complete": complete}


def curve_certificates_unknown_public(host_keys: dict, controller: dict) -> list:
    """Paths of a host's public key files that are not the controller's (checksums differ).

    Only these have to be read on the host for their fingerprints; the others are the
    controller's files, whose fingerprints are known.
    """
    paths = []
    for src, copies in sorted((host_keys or {}).items()):
        if src.endswith(".key_secret"):
            continue
        wanted = (controller.get("files", {}).get(src) or {}).get("sha1")
        paths += [c["path"] for c in copies if c["checksum"] != wanted]
    return sorted(paths)


def curve_certificates_public_fingerprints(read_result) -> dict:
    """{path: fingerprint} from `grep -H public-key FILE...` output (a registered command)."""
    lines = (read_result or {}).get("stdout_lines") or []
    found = {}
    for line in lines:
        match = GREP_LINE.match(line)
        if match:
            found[match["path"]] = curve_certificates_fingerprint(match["key"])
    return found


def _pair_names(controller: dict, hosts: dict) -> list:
    names = []
    for src in list(controller.get("files", {})) + [s for h in hosts.values() for s in h.get("files", {})]:
        name = src.rsplit(".", 1)[0]
        if name not in names:
            names.append(name)
    return names


def _analyse(controller: dict, hosts: dict) -> dict:
    """Each key file (by controller name): the controller's identity, the hosts' identities, a state.

    The identity of a public file is its key's fingerprint, that of a secret file its
    checksum (never shown). States: new (no host holds it), same, missing (the controller
    does not hold it), differs (the controller holds another one), disagree (the hosts hold
    different ones).
    """
    srcs = []
    for host in hosts.values():
        for src in host.get("files", {}):
            if src not in srcs:
                srcs.append(src)
    for src in controller.get("files", {}):
        if src not in srcs:
            srcs.append(src)
    result = {}
    for src in srcs:
        secret = src.endswith(".key_secret")
        mine = controller.get("files", {}).get(src)
        mine_id = None
        if mine:
            mine_id = ("sha1:" + mine["sha1"]) if secret else (mine["fingerprint"] or "sha1:" + mine["sha1"])
        copies = []
        for host, held in hosts.items():
            for copy in held.get("files", {}).get(src, []):
                if secret:
                    ident = "sha1:" + str(copy["checksum"])
                elif mine and copy["checksum"] == mine["sha1"]:
                    ident = mine_id
                else:
                    ident = held.get("fingerprints", {}).get(copy["path"]) or "unreadable"
                copies.append({"host": host, "path": copy["path"], "checksum": copy["checksum"], "id": ident,
                               "rank": copy.get("rank", 0)})
        ids = {c["id"] for c in copies}
        if not copies:
            state = "new"
        elif len(ids) > 1:
            state = "disagree"
        elif mine is None:
            state = "missing"
        elif mine_id not in ids:
            state = "differs"
        else:
            state = "same"
        result[src] = {"secret": secret, "controller": mine_id, "copies": copies, "state": state}
    return result


def _fingerprint_table(analysis: dict, controller: dict, hosts: dict, names: list) -> str:
    """'server: controller missing; ai-lab-mainpc 3f9a1c0b2d4e5f60, ai-lab-pc2 3f9a1c0b2d4e5f60. ...'"""
    parts = []
    for name in names:
        public, secret = analysis.get(f"{name}.key"), analysis.get(f"{name}.key_secret")
        if not public and not secret:
            continue
        mine = (controller.get("files", {}).get(f"{name}.key") or {}).get("fingerprint") or "missing"
        shown = []
        for host in hosts:
            prints = []
            for copy in (public or {}).get("copies", []):
                if copy["host"] == host and copy["id"] not in prints:
                    prints.append(copy["id"])
            if prints:
                shown.append(f"{host} {'/'.join(prints)}")
            elif any(c["host"] == host for c in (secret or {}).get("copies", [])):
                shown.append(f"{host} (only the secret file)")
            else:
                shown.append(f"{host} none")
        note = ""
        if secret and secret["state"] in ("differs", "disagree") and (public or {}).get("state") in ("same", None):
            holders = sorted({c["host"] for c in secret["copies"]})
            note = (" (the secret files differ between the hosts)" if secret["state"] == "disagree"
                    else f" (same public key, but the secret file differs from that of {', '.join(holders)})")
        elif secret and secret["state"] == "disagree":
            note = " (the secret files differ too)"
        parts.append(f"{name}: controller {mine}; {', '.join(shown)}{note}")
    return ". ".join(parts)


def curve_certificates_controller_refusal(controller: dict) -> str:
    """The message for a controller directory the role cannot use as it is ('' when it can)."""
    problems = controller.get("problems") or []
    if not problems:
        return ""
    return (
        f"Refusing to run with the controller's CurveZMQ key pairs in {controller['dir']} as they are "
        f"(nothing was changed): {'; '.join(problems)}. Ways out: restore the missing or damaged files from a "
        f"backup of {controller['dir']}; or, when the hosts hold the pairs, rebuild the directory from them with "
        f"`{RECOVER}` (-e curve_certificates_recover_replace=true when it holds other keys); or, when no host holds "
        f"these pairs yet, remove the stray files and the next run makes new pairs; or replace every key on "
        f"purpose with `{ROTATE}`."
    )


def curve_certificates_key_check(controller: dict, hosts: dict) -> dict:
    """Whether the controller's pairs may be distributed to the hosts as they are.

    hosts: {host: {'files': curve_certificates_host_keys, 'fingerprints': {path: fingerprint}}}.
    Returns {'refuse': bool, 'message': str, 'states': {src: state}}. Refused: a key file that
    some host holds and the controller lacks or holds differently, or that the hosts hold
    differently. Files no host holds (a first deployment) are simply distributed.
    """
    analysis = _analyse(controller, hosts)
    states = {src: a["state"] for src, a in analysis.items()}
    missing = sorted({s.rsplit(".", 1)[0] for s, st in states.items() if st == "missing"})
    differs = sorted({s.rsplit(".", 1)[0] for s, st in states.items() if st == "differs"})
    disagree = sorted({s.rsplit(".", 1)[0] for s, st in states.items() if st == "disagree"})
    if not (missing or differs or disagree):
        return {"refuse": False, "message": "", "states": states}
    reasons = []
    if missing:
        reasons.append(f"the hosts hold key pairs ({', '.join(missing)}) that the controller's directory "
                       f"{controller['dir']} does not")
    if differs:
        reasons.append(f"the controller's pairs ({', '.join(differs)}) in {controller['dir']} differ from those "
                       f"the hosts hold")
    if disagree:
        reasons.append(f"the hosts hold different keys ({', '.join(disagree)})")
    table = _fingerprint_table(analysis, controller, hosts, _pair_names(controller, hosts))
    ways = []
    if disagree:
        ways.append("make the hosts agree first: remove the key files of the hosts whose keys are wrong (the next "
                    "run gives them the controller's pairs), or rebuild the controller's directory from the host "
                    f"whose keys are right with `{RECOVER} --limit HOST` and then remove the others' key files")
    else:
        ways.append(f"restore {controller['dir']} from a backup")
        ways.append(f"rebuild it from the hosts with `{RECOVER}"
                    + (" -e curve_certificates_recover_replace=true` (it replaces the controller's other pairs)"
                       if differs else "`"))
    ways.append(f"replace every key on purpose with `{ROTATE}` (every container restarts; clients outside Ansible "
                "need the new keys)")
    message = (
        "Refusing to replace the CurveZMQ keys the hosts hold (nothing was changed): " + "; ".join(reasons)
        + ". Public key fingerprints (sha256 of the Z85 key, first 16 hex digits): " + table
        + ". Ways out: " + "; or ".join(ways) + "."
    )
    return {"refuse": True, "message": message, "states": states}


def curve_certificates_recover_plan(controller: dict, hosts: dict, layout: list, replace: bool = False) -> dict:
    """What recover-keys.yml writes to the controller's directory, or why it cannot.

    Returns {'ok': bool, 'message': str, 'files': [{'src', 'host', 'path', 'secret'}]}: for
    each file of the controller's directory, one host copy to write it from (the certificate
    directory's copy first). Every host that holds a file must hold the same one; a
    controller file that holds another key is only replaced with replace=true.
    """
    analysis = _analyse(controller, hosts)
    names = _pair_names({"files": {e["src"]: None for e in layout}}, {})
    table = _fingerprint_table(analysis, controller, hosts, names)
    wanted = []
    for entry in layout:
        if entry["src"] not in wanted:
            wanted.append(entry["src"])
    held = [h for h, v in hosts.items() if v.get("files")]
    if not held:
        return {"ok": False, "files": [], "message": (
            f"No host of {', '.join(hosts) or 'this play'} holds any CurveZMQ key file: there is nothing to "
            f"recover. A first deployment (site.yml) makes new pairs.")}
    def pairs_in(state):
        found = []
        for src in wanted:
            name = src.rsplit(".", 1)[0]
            if (analysis.get(src, {}).get("state", "new") == state) and name not in found:
                found.append(name)
        return found

    problems = []
    disagree = pairs_in("disagree")
    if disagree:
        problems.append(f"the hosts hold different keys ({', '.join(disagree)}); rebuild from the host whose keys are "
                        f"right with `{RECOVER} --limit HOST`, or replace every key on purpose with `{ROTATE}`")
    # A file no host holds is only lost when the controller lacks it too.
    lost = [s for s in wanted if s not in controller.get("files", {})
            and (s not in analysis or analysis[s]["state"] == "new")]
    if lost:
        problems.append(f"no host holds {', '.join(lost)}, so it cannot be recovered; replace the keys on purpose "
                        f"with `{ROTATE}`")
    differs = pairs_in("differs")
    if differs and not replace:
        problems.append(f"the controller's pairs {', '.join(differs)} in {controller['dir']} hold other keys than the "
                        f"hosts'; `-e curve_certificates_recover_replace=true` replaces them with the hosts' keys")
    if problems:
        return {"ok": False, "files": [], "message": (
            "Refusing to recover the controller's CurveZMQ key pairs (nothing was changed): " + "; ".join(problems)
            + ". Public key fingerprints (sha256 of the Z85 key, first 16 hex digits): " + table + ".")}
    files = []
    for src in wanted:
        copies = analysis[src]["copies"]
        if not copies:
            continue  # the controller's own file, which no host holds
        mine = controller.get("files", {}).get(src)
        if mine and all(c["checksum"] == mine["sha1"] for c in copies):
            continue  # already the hosts' file, byte for byte
        # The first host's copy, from the certificate directory when it holds one.
        first = sorted(copies, key=lambda c: (list(hosts).index(c["host"]), c["rank"]))[0]
        files.append({"src": src, "host": first["host"], "path": first["path"], "secret": src.endswith(".key_secret")})
    sources = sorted({f["host"] for f in files})
    return {"ok": True, "files": files, "message": (
        f"The hosts agree ({', '.join(held)}). Public key fingerprints (sha256 of the Z85 key, first 16 hex digits): "
        f"{table}. " + (f"{len(files)} file(s) to write to {controller['dir']} from {', '.join(sources)}."
                        if files else f"{controller['dir']} already holds the hosts' keys."))}


# A Z85 key is a run of exactly 40 characters of this alphabet; nothing that looks like
# one leaves a message.
_Z85 = r'[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]'
Z85_KEY = re.compile(rf'(?<!{_Z85}){_Z85}{{40}}(?!{_Z85})')


def curve_certificates_failure(result) -> str:
    """Why a no_log task (or one item of its loop) failed, without any key material.

    ``result`` is ``ansible_failed_result``. Only module messages are read (never the
    arguments, which hold the content); anything shaped like a Z85 key is masked, and the
    text is cut to 300 characters.
    """
    result = result or {}
    items = [r for r in result.get("results") or [] if isinstance(r, dict) and r.get("failed")]
    if items:
        reasons = []
        for item in items:
            label = item.get("_ansible_item_label", item.get("item"))
            if isinstance(label, dict):  # a loop item: only its path, never its content
                label = label.get("dest") or label.get("src") or label.get("path") or "an item"
            reasons.append(f"{label}: {str(item.get('msg') or 'no message').strip()}")
        text = "; ".join(reasons)
    else:
        text = str(result.get("msg") or "no message").strip()
    text = Z85_KEY.sub("*" * 8, text)
    return text if len(text) <= 300 else text[:297] + "..."


class FilterModule:
    def filters(self):
        return {
            "curve_certificates_in_place": curve_certificates_in_place,
            "curve_certificates_fingerprint": curve_certificates_fingerprint,
            "curve_certificates_layout": curve_certificates_layout,
            "curve_certificates_host_keys": curve_certificates_host_keys,
            "curve_certificates_controller_keys": curve_certificates_controller_keys,
            "curve_certificates_unknown_public": curve_certificates_unknown_public,
            "curve_certificates_public_fingerprints": curve_certificates_public_fingerprints,
            "curve_certificates_controller_refusal": curve_certificates_controller_refusal,
            "curve_certificates_key_check": curve_certificates_key_check,
            "curve_certificates_recover_plan": curve_certificates_recover_plan,
            "curve_certificates_failure": curve_certificates_failure,
        }
