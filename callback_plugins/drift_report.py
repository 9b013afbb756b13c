# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Drift report of an ``ansible-playbook --check --diff`` run (JSON + Markdown), secrets redacted.

The redaction helpers (``is_secret_key``, ``redact_text``, ``redact``, ``LineRedactor``) need
nothing but the standard library: ``scripts/drift-check`` also uses them to filter the
playbook's output before it reaches ``ansible.log``.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

try:
    from ansible import context
    from ansible.plugins.callback import CallbackBase
except ImportError:  # scripts/drift-check imports the redaction helpers with any python3
    context = None
    CallbackBase = object

DOCUMENTATION = r"""
name: drift_report
type: aggregate
short_description: Write a drift report (JSON and Markdown) of a check-mode run, secrets redacted
description:
  - Records every task result on every host (loop items one by one) with host, play, role, task name,
    action and status (V(ok), V(changed), V(failed), V(unreachable), V(skipped)).
  - At the end of the run writes C(drift-report.json) (machine-readable) and C(drift-report.md)
    (a summary table per host, then per host each drift entry with what would change and a
    unified diff, truncated per entry) to O(report_dir).
  - Meant for C(ansible-playbook --check --diff); C(scripts/drift-check) runs it that way.
  - "Drift is: (1) a V(changed) result (what check mode would change; its C(diff) is reported);
    (2) runtime drift, reported without being V(changed): a result with a non-empty key
    C(drift_findings) (a list of strings or dicts, or one string), or a V(failed) result of a task
    whose name starts with C(Drift:) or that is tagged C(drift)."
  - "Errors are: unreachable hosts, and failed results that carry no drift marker (see above) and
    are not ignored (C(ignore_errors)). Ignored failures are recorded but are neither drift nor errors."
  - "Coverage: every host that a play of the run targets (within C(--limit)) gets a status: V(checked)
    (every play that targets it ran to its end on it), V(partially checked) (some did; the report lists
    them) or V(not checked) (none did). A play did not run to its end on a host that failed or was
    unreachable in it, that another host's failure stopped (C(any_errors_fatal), C(max_fail_percentage),
    a failed C(run_once) task), or that it never reached (the run stopped earlier, or the host had
    failed in an earlier play). A host that a C(meta: end_host) (or C(end_play), C(end_batch)) ended
    counts as checked by that play: the playbook itself ended it. Any host not fully checked makes
    the summary status V(error)."
  - "Secrets never reach the report: results of C(no_log) tasks are written as '(hidden: no_log)';
    every string is redacted first: PEM private key blocks, CurveZMQ C(secret-key = \"...\") lines,
    values of keys named like secret, password, passwd, passphrase, token, private or credential
    (in dicts, JSON, YAML-ish C(key: value) and C(key = value) text, YAML block scalars), and Z85
    keys (40 characters of the Z85 alphabet, alone or after C(name=)) on a line that mentions C(secret)."
author:
  - AI system provisioning team (@ai-system-provisioning)
requirements:
  - Enable it, e.g. C(ANSIBLE_CALLBACKS_ENABLED=drift_report) or C(callbacks_enabled) in C(ansible.cfg).
options:
  report_dir:
    description:
      - Directory to write C(drift-report.json) and C(drift-report.md) to (created if missing).
      - If unset the plugin only warns and writes nothing.
    type: path
    env:
      - name: DRIFT_REPORT_DIR
    ini:
      - section: callback_drift_report
        key: report_dir
  max_diff_lines:
    description: Lines of unified diff shown per entry in the Markdown report (the JSON keeps more).
    type: int
    default: 200
    env:
      - name: DRIFT_REPORT_MAX_DIFF_LINES
    ini:
      - section: callback_drift_report
        key: max_diff_lines
notes:
  - "Contract for roles that report runtime drift (e.g. a health check in check mode): either return
    C(drift_findings), most simply with C(ansible.builtin.debug: {var: drift_findings}) and a task var
    C(drift_findings) holding the list (empty list = no drift), or name the task C(Drift: ...) and let
    it fail, with C(ignore_errors: true) so that the play goes on. Do not put C(no_log) on such tasks:
    a no_log result is censored and its findings are lost."
  - Tasks that always report V(changed) show up as drift; give them a correct C(changed_when).
seealso:
  - name: Drift check
    description: docs/drift-check.md in this repository (scripts/drift-check, exit codes, scheduling).
    link: https://docs.ansible.com/ansible/latest/playbook_guide/playbooks_checkmode.html
"""

REDACTED = '<redacted>'
HIDDEN = '(hidden: no_log)'
STATUSES = ('ok', 'changed', 'failed', 'unreachable', 'skipped')
# Coverage of a host: all the plays that target it ran to their end on it, some did, none did.
CHECKED, PARTIALLY_CHECKED, NOT_CHECKED = 'checked', 'partially checked', 'not checked'
# Meta tasks that end a play for hosts on purpose: such a host was checked as far as the play goes.
END_METAS = ('end_host', 'end_play', 'end_batch')
JSON_TEXT_LIMIT = 100_000  # characters per string in drift-report.json
MD_ENTRY_CHARS = 12_000  # characters of diff per entry in drift-report.md
MSG_LIMIT = 2_000

# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------

_KEY_WORD_RE = re.compile(r'[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])')

# `key:` or `key =`, the key optionally quoted (also JSON-escaped \"key\" inside a string). Only the
# values of secret keys are matched (_VALUE_RE), so pairs nested in a harmless value are found too.
_KEY_RE = re.compile(
    r"""
    (?:(?<=\\[nrt])|(?<![\w.\\]))         # a key starts a word (also after an escaped newline)
    (?P<kq>\\?["']?)
    (?P<key>[A-Za-z_][\w.\-]*)
    (?P=kq)
    [ \t]*[:=][ \t]*
    """,
    re.VERBOSE,
)
_VALUE_RE = re.compile(
    r"""
      \\"(?:[^\\\n]|\\[^"\n])*?\\"            # \"...\" inside a JSON string
    | "(?:[^"\\\n]|\\.)*"
    | '[^'\n]*'
    | [^\s"'\\](?:[^"\r\n\\]|\\(?![nr"]))*    # bare: to the end of the (possibly escaped) line
    """,
    re.VERBOSE,
)
_BLOCK_SCALAR_RE = re.compile(r'^(?:!\S+\s+)?[|>][+-]?[0-9]?\s*$')
_PEM_LABEL = r'[A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*'
_PEM_INLINE_RE = re.compile(r'(-----BEGIN (' + _PEM_LABEL + r')-----).*?(-----END \2-----)', re.DOTALL)
_PEM_BEGIN_RE = re.compile(r'-----BEGIN ' + _PEM_LABEL + r'-----')
_PEM_END_RE = re.compile(r'-----END ' + _PEM_LABEL + r'-----')
# Z85 (ZeroMQ's key encoding): CurveZMQ keys are 40 characters of this alphabet.
_Z85_RUN_RE = re.compile(r'[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40,}')
_LINE_PREFIX_RE = re.compile(r'^([+\- ]?)([ \t]*)')
# Lines that cannot be inside a PEM block: an Ansible banner, a Markdown fence or heading.
_CUT_OFF_RE = re.compile(r'^(?:(?:PLAY|TASK|RUNNING HANDLER) \[|```|#{1,6} )')


def is_secret_key(name: str) -> bool:
    """True if NAME looks like the name of secret material (secret, password, token, private...)."""
    for word in (w.lower() for w in _KEY_WORD_RE.findall(str(name))):
        if any(part in word for part in ('secret', 'passw', 'passphrase', 'credential')):
            return True
        if word.endswith(('token', 'tokens')) or word.startswith('private'):
            return True
    return False


class LineRedactor:
    """Redacts secrets line by line; keeps state across lines for PEM blocks and YAML block scalars.

    Used for whole texts (``redact_text``) and for streamed output (``scripts/drift-check``).
    Lines may carry a unified-diff prefix (``+``, ``-``, space), which is kept.
    """

    def __init__(self) -> None:
        self._in_pem = False
        self._block_indent: int | None = None

    def __call__(self, line: str) -> str:
        body = line.rstrip('\r\n')
        ending = line[len(body):]
        return self._redact_line(body) + ending

    def _redact_line(self, line: str) -> str:
        prefix, indent = _LINE_PREFIX_RE.match(line).groups()
        if self._in_pem:
            if _CUT_OFF_RE.match(line):  # the block was cut off (truncated output)
                self._in_pem = False
            elif end := _PEM_END_RE.search(line):
                self._in_pem = False
                return line[:min(end.start(), len(prefix + indent))] + line[end.start():]
            else:
                return prefix + indent + REDACTED if line.strip() else line
        if self._block_indent is not None:
            if not line.strip():
                return line
            if len(indent) > self._block_indent:
                return prefix + indent + REDACTED
            self._block_indent = None

        line = _PEM_INLINE_RE.sub(lambda m: f'{m[1]} {REDACTED} {m[3]}', line)
        begins = list(_PEM_BEGIN_RE.finditer(line))
        if begins and not _PEM_END_RE.search(line, begins[-1].end()):
            # A block that goes on in the next lines: hide the rest of this one and those.
            self._in_pem = True
            return line[:begins[-1].end()]

        line, block_scalar = _redact_pairs(line)
        if block_scalar:
            self._block_indent = len(indent)
        if 'secret' in line.lower():
            line = _Z85_RUN_RE.sub(_z85_key, line)
        return line


def _z85_key(match: re.Match[str]) -> str:
    """A run of Z85 characters, its key redacted: all 40 of them, or the 40 after a `name=`/`name:`.

    Longer runs without such a separator are paths or URLs and stay.
    """
    run = match[0]
    if len(run) == 40:
        return REDACTED
    if run[-41] in '=:':
        return run[:-40] + REDACTED
    return run


def _redact_pairs(line: str) -> tuple[str, bool]:
    """LINE with the values of secret keys redacted; also whether one opens a YAML block scalar."""
    parts, pos, block_scalar = [], 0, False
    for match in _KEY_RE.finditer(line):
        if match.start() < pos or not is_secret_key(match['key']):
            continue  # inside a value already redacted, or a harmless key
        value = _VALUE_RE.match(line, match.end())
        if value is None:
            continue  # no value on this line
        text = value[0]
        if text.startswith('\\"'):
            new = f'\\"{REDACTED}\\"'
        elif text[0] in '"\'':
            new = f'{text[0]}{REDACTED}{text[0]}'
        else:
            block_scalar = block_scalar or bool(_BLOCK_SCALAR_RE.match(text))
            new = REDACTED
        parts += [line[pos:match.end()], new]
        pos = value.end()
    return ''.join(parts) + line[pos:], block_scalar


def redact_text(text: str) -> str:
    """TEXT with secret material replaced by ``<redacted>`` (see the plugin's description)."""
    redactor = LineRedactor()
    return ''.join(redactor(line) for line in text.splitlines(keepends=True))


def redact(value: Any, key: str | None = None) -> Any:
    """VALUE (any JSON-like data) with every string redacted and values of secret keys replaced."""
    if key is not None and is_secret_key(key) and value is not None and not isinstance(value, bool):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Report helpers
# ---------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f'\n... ({len(text) - limit} more characters truncated)\n'


def _cap_strings(value: Any, limit: int = JSON_TEXT_LIMIT) -> Any:
    if isinstance(value, str):
        return _truncate(value, limit)
    if isinstance(value, dict):
        return {k: _cap_strings(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_cap_strings(v, limit) for v in value]
    return value


def _as_text(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, sort_keys=True, default=str) + '\n'


def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ('true', 'yes', '1'))


def _play_hosts(play: Any, ignore_restrictions: bool) -> list[str] | None:
    """Names of the hosts PLAY targets, within --limit; None if they cannot be told.

    IGNORE_RESTRICTIONS false: only those of the serial batch that runs now.
    """
    try:
        variable_manager = play.get_variable_manager()
        inventory = getattr(variable_manager, '_inventory', None)
        if inventory is None:
            return None
        pattern = play.hosts
        if '{{' in str(pattern):  # a play that never started is not templated yet
            from ansible.template import Templar
            templar = Templar(loader=play.get_loader(), variables=variable_manager.get_vars(play=play))
            pattern = templar.template(pattern)
        return [host.get_name() for host in inventory.get_hosts(pattern, ignore_restrictions=ignore_restrictions)]
    except Exception:  # noqa: BLE001 - a report without coverage of this play beats no report
        return None


def _one_line(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit] + '...'


def normalize_diffs(diff: Any) -> list[dict[str, Any]]:
    """Ansible's ``diff`` (a dict or a list of dicts) as report entries with a unified diff.

    The unified diff is made from the raw texts and redacted afterwards, so a changed secret
    still shows as a changed (redacted) line.
    """
    entries = []
    for item in diff if isinstance(diff, list) else [diff]:
        if not isinstance(item, Mapping):
            continue
        entry: dict[str, Any] = {}
        for key in ('before_header', 'after_header'):
            if item.get(key) is not None:
                entry[key] = str(item[key])
        notes = []
        for key, note in (('dst_binary', 'destination file appears to be binary'),
                          ('src_binary', 'source file appears to be binary'),
                          ('dst_larger', 'destination file is larger than {}'),
                          ('src_larger', 'source file is larger than {}')):
            if key in item:
                notes.append('diff skipped: ' + note.format(item[key]))
        if notes:
            entry['notes'] = notes
        if 'before' in item or 'after' in item:
            before, after = item.get('before'), item.get('after')
            for key, value in (('before', before), ('after', after)):
                if isinstance(value, Mapping):
                    entry[key] = dict(value)  # small structured state, e.g. file attributes
            before_lines = _as_text(before).splitlines(keepends=True)
            after_lines = _as_text(after).splitlines(keepends=True)
            for lines in (before_lines, after_lines):
                if lines and not lines[-1].endswith('\n'):
                    lines[-1] += '\n\\ No newline at end of file\n'
            unified = list(difflib.unified_diff(
                before_lines, after_lines,
                fromfile='before' + (f": {entry['before_header']}" if 'before_header' in entry else ''),
                tofile='after' + (f": {entry['after_header']}" if 'after_header' in entry else ''),
                n=3,
            ))
            entry['added'] = sum(1 for ln in unified if ln.startswith('+') and not ln.startswith('+++'))
            entry['removed'] = sum(1 for ln in unified if ln.startswith('-') and not ln.startswith('---'))
            entry['unified'] = ''.join(unified)
        if item.get('prepared'):
            entry['prepared'] = str(item['prepared'])
        if entry:
            entries.append(entry)
    return entries


def _dict_changes(before: Mapping[str, Any], after: Mapping[str, Any], limit: int = 6) -> list[str]:
    changes = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            if is_secret_key(key):
                changes.append(f'{key} changes')
            else:
                changes.append(f'{key} {_one_line(before.get(key), 60)} -> {_one_line(after.get(key), 60)}')
    return changes[:limit] + ([f'{len(changes) - limit} more'] if len(changes) > limit else [])


def change_summary(action: str, data: Mapping[str, Any], diffs: list[dict[str, Any]], item: str | None) -> str:
    """A one-line summary of what a changed result would change."""
    short = action.rsplit('.', 1)[-1] or 'task'
    # Check-mode results often lack dest/path; the diff headers name the file instead.
    candidates = [data.get(k) for k in ('dest', 'path', 'name')]
    candidates += [d.get(k) for d in diffs for k in ('before_header', 'after_header')] + [item]
    target = next((str(c) for c in candidates if isinstance(c, str) and c), 'something')
    parts = []
    for entry in diffs:
        if 'before' in entry and 'after' in entry:
            parts.extend(_dict_changes(entry['before'], entry['after']))
        elif 'unified' in entry:
            header = entry.get('before_header') or entry.get('after_header')
            stats = f"+{entry['added']} -{entry['removed']} lines"
            parts.append(f'{header} ({stats})' if header and header != target else stats)
        parts.extend(entry.get('notes', []))
        if 'prepared' in entry and 'unified' not in entry:
            parts.append(_one_line(entry['prepared'], 200))
    if not parts and isinstance(data.get('msg'), str) and data['msg']:
        parts.append(_one_line(data['msg'], 200))
    text = f'{short} would change {target}'
    return text + (' (' + '; '.join(parts) + ')' if parts else '')


def normalize_findings(value: Any) -> list[Any]:
    """``drift_findings`` as a list; None, '' and [] mean no findings."""
    if value is None or value in ('', [], {}):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _finding_text(finding: Any) -> str:
    if isinstance(finding, Mapping):
        return ', '.join(f'{k}={_one_line(v, 120)}' for k, v in finding.items())
    return _one_line(finding, 300)


def _md_cell(value: Any) -> str:
    return str(value).replace('|', '\\|').replace('\n', ' ') if value not in (None, '') else '-'


def _md_fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r'`+', text)), default=0)
    return '`' * max(3, longest + 1)


def _md_diff(diff: Mapping[str, Any], max_lines: int) -> str:
    text = diff.get('unified') or diff.get('prepared') or ''
    if not text:
        return ''
    lines = text.splitlines()
    more = len(lines) - max_lines
    text = '\n'.join(lines[:max_lines])
    if len(text) > MD_ENTRY_CHARS:
        text = text[:MD_ENTRY_CHARS]
        more = max(more, 1)
    if more > 0:
        text += '\n... (truncated; the full diff is in drift-report.json)'
    fence = _md_fence(text)
    return f'{fence}diff\n{text}\n{fence}\n'


def _md_coverage(counts: Mapping[str, Any]) -> list[str]:
    """Lines telling which plays ran to their end on a host (nothing for a report without coverage)."""
    if 'status' not in counts:
        return []
    plays = counts.get('plays', [])
    if counts['status'] == CHECKED:
        if len(plays) == 1:
            return ['Checked: the play that targets this host ran to its end.', '']
        return [f'Checked: all {len(plays)} plays that target this host ran to their end.', '']
    if counts['status'] == PARTIALLY_CHECKED:
        head = f"**Partially checked**: {len(counts['plays_checked'])} of {len(plays)} plays ran to their end on this host:"
    else:
        head = '**Not checked**: no play ran to its end on this host' + (':' if plays else '.')
    lines = [f"- {p['play']}: {p['status']}" + (f" ({p['reason']})" if p.get('reason') else '') for p in plays]
    return [head, ''] + lines + ([''] if lines else [])


def render_markdown(report: Mapping[str, Any], max_diff_lines: int = 200) -> str:
    """The human-readable report, from the (already redacted) REPORT dict."""
    status = report['summary']['status']
    title = {'clean': 'no drift', 'drift': 'DRIFT FOUND', 'error': 'ERRORS'}[status]
    if status == 'error' and report['summary'].get('errors') == 0:
        title = 'NOT FULLY CHECKED'
    out = [f'# Drift report: {title}', '']
    meta = [
        ('Started', report['started']),
        ('Finished', report['finished']),
        ('Playbooks', ', '.join(report['playbooks'])),
        ('Inventory', ', '.join(report['inventory'])),
        ('Limit', report['limit']),
        ('Mode', ('check' if report['check_mode'] else 'APPLY (not check mode)') + (' + diff' if report['diff_mode'] else '')),
    ]
    out += ['| | |', '|---|---|'] + [f'| {k} | {_md_cell(v)} |' for k, v in meta] + ['']
    out += ['## Summary', '', '| Host | Checked | Drift | Errors | ok | changed | failed | unreachable | skipped |',
            '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for host, counts in report['hosts'].items():
        cells = [_md_cell(counts.get('status')), counts['drift'], counts['errors']] + [counts[s] for s in STATUSES]
        out.append(f'| {_md_cell(host)} | ' + ' | '.join(str(c) for c in cells) + ' |')
    out.append('')
    incomplete = [f"{host} ({c.get('status')})" for host, c in report['hosts'].items() if c.get('status', CHECKED) != CHECKED]
    if incomplete:
        out += [f"**Not fully checked: {', '.join(incomplete)}.** The drift listed below is what the plays that "
                'ran found; the plays that did not run to their end on a host may hide more.', '']
    for host, counts in report['hosts'].items():
        drift = [d for d in report['drift'] if d['host'] == host]
        errors = [e for e in report['errors'] if e['host'] == host]
        out += [f'## {host}', '']
        status = counts.get('status', CHECKED)
        out += _md_coverage(counts)
        if not drift and not errors:
            if status == CHECKED:
                out += ['No drift.', '']
            elif status == PARTIALLY_CHECKED:
                out += ['No drift in the plays checked.', '']
        for number, entry in enumerate(drift, 1):
            title = entry['task'] + (f" [{entry['item']}]" if entry.get('item') else '')
            out += [f'### {number}. {title}', '']
            where = [f"play: {_md_cell(entry['play'])}", f"action: `{entry['action']}`"]
            if entry.get('role'):
                where.insert(1, f"role: {entry['role']}")
            out.append('- ' + ', '.join(where))
            if entry.get('findings'):
                out.append(f"- Runtime drift, {len(entry['findings'])} finding(s):")
                out += [f'  - {_finding_text(finding)}' for finding in entry['findings']]
            else:
                label = 'Check failed' if entry['kind'] == 'check_failed' else 'What would change'
                out.append(f"- {label}: {entry['summary']}")
            out.append('')
            for diff in entry.get('diffs', []):
                if block := _md_diff(diff, max_diff_lines):
                    out += [block]
        if errors:
            out += ['### Errors', '']
            for entry in errors:
                label = entry['task'] + (f" [{entry['item']}]" if entry.get('item') else '')
                out.append(f"- **{entry['status']}**: {label} (`{entry['action']}`): {_one_line(entry.get('msg') or '', 500)}")
            out.append('')
    return '\n'.join(out).rstrip('\n') + '\n'


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------


class CallbackModule(CallbackBase):
    """Collect every task result; write the drift report when the run ends."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'aggregate'
    CALLBACK_NAME = 'drift_report'
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, display: Any = None) -> None:
        super().__init__(display=display)
        self._started = _now()
        self._play = ''
        self._playbooks: list[str] = []
        self._results: list[dict[str, Any]] = []
        self._drift: list[dict[str, Any]] = []
        self._errors: list[dict[str, Any]] = []
        self._hosts: dict[str, dict[str, int]] = {}
        # Coverage: the plays of the run (in order), each with the batches that started.
        self._plays: list[dict[str, Any]] = []
        self._batch: dict[str, Any] | None = None  # the batch running now
        self._end_meta: tuple[str, set[str]] | None = None  # a meta end_* task running: (kind, removed before)
        # host -> (index and name of the play, what happened): when a host first left a play before its end.
        self._host_failures: dict[str, tuple[int, str, str]] = {}

    # -- events --------------------------------------------------------------------------------

    def v2_playbook_on_start(self, playbook: Any) -> None:
        name = str(getattr(playbook, '_file_name', playbook))
        self._playbooks.append(name)
        try:
            plays = list(playbook.get_plays())
        except AttributeError:
            plays = []
        for play in plays:  # all of them, also those that an aborted run never starts
            self._play_entry(play, name)

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._finish_batch()
        self._play = str(play.get_name()).strip()
        entry = self._play_entry(play)
        # The play object of this batch: Ansible runs a copy of the play per serial batch, and
        # the inventory is restricted to the batch now.
        targets = _play_hosts(play, ignore_restrictions=True)
        if targets is not None:
            entry['targets'] = targets
        batch = _play_hosts(play, ignore_restrictions=False)
        self._batch = {
            'play': play,
            'hosts': batch if batch is not None else list(entry['targets'] or []),
            'ran': set(), 'failed': {}, 'ended': set(), 'end_play': False, 'abort': None, 'removed': None,
        }
        entry['batches'].append(self._batch)

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool = False) -> None:
        self._on_task_start(task)

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self._on_task_start(task)

    def v2_playbook_on_no_hosts_remaining(self) -> None:
        if self._batch is not None and not self._batch['abort']:
            self._batch['abort'] = 'the play stopped: too many hosts failed (max_fail_percentage) or all failed'

    def v2_runner_on_ok(self, result: Any) -> None:
        self._on_task(result, 'ok')

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._on_task(result, 'failed', ignore_errors)

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._on_task(result, 'skipped')

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._on_task(result, 'unreachable')

    def v2_runner_item_on_ok(self, result: Any) -> None:
        self._record(result, 'ok', item=True)

    def v2_runner_item_on_failed(self, result: Any) -> None:
        data = self._data(result)
        status = 'unreachable' if data.get('unreachable') else 'failed'
        self._record(result, status, self._ignored(result, status), item=True)

    def v2_runner_item_on_skipped(self, result: Any) -> None:
        self._record(result, 'skipped', item=True)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._finish_batch()
        for host in sorted(getattr(stats, 'processed', {}) or {}):
            self._host(host)
        report_dir = self.get_option('report_dir')
        if not report_dir:
            self._display.warning('drift_report: no report_dir (DRIFT_REPORT_DIR) set, no report written')
            return
        try:
            self.write_report(report_dir)
        except OSError as e:
            self._display.warning(f'drift_report: could not write the report to {report_dir}: {e}')

    # -- recording -----------------------------------------------------------------------------

    @staticmethod
    def _data(result: Any) -> Mapping[str, Any]:
        data = getattr(result, 'result', None)  # ansible-core >= 2.19
        if data is None:
            data = result._result
        return data if isinstance(data, Mapping) else {}

    @staticmethod
    def _ignored(result: Any, status: str) -> bool:
        field = 'ignore_unreachable' if status == 'unreachable' else 'ignore_errors'
        value = result.task_fields.get(field)
        if value is None:
            value = getattr(result.task, field, False)
        return bool(value) if isinstance(value, bool) else str(value).lower() in ('true', 'yes', '1')

    def _on_task(self, result: Any, status: str, ignore_errors: bool = False) -> None:
        data = self._data(result)
        if status == 'unreachable':
            ignore_errors = self._ignored(result, status)
        self._track(result, status, ignore_errors)
        if isinstance(data.get('results'), list) and data['results']:
            return  # a loop: its items were recorded one by one
        self._record(result, status, ignore_errors)

    # -- coverage ------------------------------------------------------------------------------

    def _play_entry(self, play: Any, playbook: str | None = None) -> dict[str, Any]:
        """The entry of PLAY in self._plays (a copy of a play, as run per batch, finds its original)."""
        uuid = getattr(play, '_uuid', None)
        for entry in self._plays:
            if uuid is not None and entry['uuid'] == uuid:
                return entry
        hosts = getattr(play, 'hosts', None)
        entry = {
            'uuid': uuid,
            'index': len(self._plays) + 1,
            'name': str(play.get_name()).strip(),
            'hosts': ','.join(map(str, hosts)) if isinstance(hosts, (list, tuple)) else str(hosts or ''),
            'playbook': playbook if playbook is not None else (self._playbooks[-1] if self._playbooks else ''),
            'object': play,
            'targets': None,  # host names, resolved when the play starts (or at the end if it never does)
            'batches': [],
        }
        self._plays.append(entry)
        return entry

    @staticmethod
    def _removed(batch: dict[str, Any]) -> set[str] | None:
        """Hosts that left BATCH's play (failed, unreachable, stopped, ended); None if unknown.

        Ansible keeps them in the play object of the batch (the hosts that ``ansible_play_hosts``
        leaves out). A rescued failure takes the host back.
        """
        removed = getattr(batch['play'], '_removed_hosts', None)
        return set(removed) if isinstance(removed, (list, set, tuple)) else None

    def _on_task_start(self, task: Any) -> None:
        self._close_end_meta()
        if self._batch is None:
            return
        action = str(getattr(task, 'action', '') or '')
        args = getattr(task, 'args', None) or {}
        kind = str(args.get('_raw_params', '')).strip() if isinstance(args, Mapping) else ''
        if action.rsplit('.', 1)[-1] == 'meta' and kind in END_METAS:
            removed = self._removed(self._batch)
            if removed is not None:
                self._end_meta = (kind, removed)

    def _close_end_meta(self) -> None:
        """Hosts that left the play during a meta end_* task were ended on purpose."""
        if self._end_meta is None or self._batch is None:
            self._end_meta = None
            return
        kind, before = self._end_meta
        self._end_meta = None
        ended = (self._removed(self._batch) or set()) - before - set(self._batch['failed'])
        self._batch['ended'] |= ended
        if kind == 'end_play' and ended:
            self._batch['end_play'] = True

    def _track(self, result: Any, status: str, ignored: bool) -> None:
        """Note for the coverage that the host ran a task of this batch, and how it failed."""
        if self._batch is None:
            return
        host = result.host.get_name()
        self._batch['ran'].add(host)
        if status not in ('failed', 'unreachable'):
            return
        if not ignored:
            name = str(result.task_fields.get('name') or result.task.name or '').strip()
            self._batch['failed'][host] = (status, name or str(result.task.action))
        # Like the linear strategy: a failure in an any_errors_fatal (or run_once) task stops every host.
        task = result.task
        if not self._ignored(result, 'failed') and not self._batch['abort']:
            what = 'was unreachable' if status == 'unreachable' else 'failed'
            if _true(getattr(task, 'any_errors_fatal', False)):
                self._batch['abort'] = f'{host} {what} and the play has any_errors_fatal'
            elif _true(getattr(task, 'run_once', False)):
                self._batch['abort'] = f'{host} {what} in a run_once task'

    def _finish_batch(self) -> None:
        """The running batch is over: note which of its hosts left the play before its end."""
        self._close_end_meta()
        batch, self._batch = self._batch, None
        if batch is None:
            return
        removed = self._removed(batch)
        if removed is None:  # no record from Ansible: infer from the results
            removed = set(batch['failed']) | (set(batch['hosts']) - batch['ran'])
            if batch['abort']:
                removed |= set(batch['hosts'])
        batch['removed'] = removed
        entry = self._play_entry(batch['play'])
        for host in sorted((removed & batch['ran']) - batch['ended']):
            what = {'failed': 'failed', 'unreachable': 'was unreachable'}.get(batch['failed'].get(host, ('',))[0], 'was stopped')
            self._host_failures.setdefault(host, (entry['index'], entry['name'], what))

    def _outcome(self, host: str, entry: dict[str, Any]) -> dict[str, Any]:
        """How far PLAY ENTRY ran on HOST: {index, play, status, reason}."""
        outcome: dict[str, Any] = {'index': entry['index'], 'play': entry['name']}
        batch = next((b for b in entry['batches'] if host in b['hosts']), None)
        index, play, what = self._host_failures.get(host, (entry['index'], '', ''))
        earlier = f'the host {what} in an earlier play: {play}' if index < entry['index'] else ''
        if batch is None:
            if any(b['end_play'] for b in entry['batches']):
                return dict(outcome, status=CHECKED)  # ended on purpose (meta: end_play)
            if not entry['batches']:
                reason = 'the run stopped before this play'
            else:
                reason = earlier or "the play stopped before this host's serial batch"
            return dict(outcome, status='not run', reason=reason)
        if host not in batch['removed'] or host in batch['ended']:
            return dict(outcome, status=CHECKED)
        if host in batch['failed']:
            status, task = batch['failed'][host]
            return dict(outcome, status=status, reason=f'at task "{task}"')
        if host not in batch['ran']:
            return dict(outcome, status='not run', reason=earlier or 'the play stopped before this host ran a task')
        return dict(outcome, status='stopped', reason=batch['abort'] or "the play stopped before its end on this host")

    def coverage(self) -> dict[str, dict[str, Any]]:
        """Per host: status (checked, partially checked, not checked), plays_checked and plays."""
        for entry in self._plays:
            if entry['targets'] is None and not entry['batches']:
                entry['targets'] = _play_hosts(entry['object'], ignore_restrictions=True)
        hosts = set(self._hosts)
        for entry in self._plays:
            hosts.update(entry['targets'] or ())
            for batch in entry['batches']:
                hosts.update(batch['hosts'])
        result = {}
        for host in sorted(hosts):
            plays = []
            for entry in self._plays:
                targeted = entry['targets'] is None or host in entry['targets']  # unknown: assume it does
                if targeted or any(host in b['hosts'] for b in entry['batches']):
                    plays.append(self._outcome(host, entry))
            checked = [p['play'] for p in plays if p['status'] == 'checked']
            if plays and len(checked) == len(plays):
                status = CHECKED
            elif checked:
                status = PARTIALLY_CHECKED
            else:
                status = NOT_CHECKED
            result[host] = {'status': status, 'plays_checked': checked, 'plays': plays}
        return result

    def _host(self, name: str) -> dict[str, Any]:
        return self._hosts.setdefault(name, dict.fromkeys((*STATUSES, 'ignored', 'drift', 'errors'), 0))

    def _record(self, result: Any, status: str, ignored: bool = False, item: bool = False) -> None:
        data = self._data(result)
        task = result.task
        hidden = bool(data.get('censored') or data.get('_ansible_no_log') or task.no_log is True)
        if status == 'ok' and data.get('changed'):
            status = 'changed'
        name = str(result.task_fields.get('name') or task.name or '').strip()
        action = str(getattr(task, 'resolved_action', None) or task.action)
        role = getattr(task, '_role', None)
        record: dict[str, Any] = {
            'host': result.host.get_name(),
            'play': self._play,
            'role': role.get_name() if role else '',
            'task': name or action,
            'action': action,
            'status': status,
        }
        if item:
            label = data.get('_ansible_item_label', data.get('item'))
            record['item'] = HIDDEN if hidden else _one_line(label, 200)
        if ignored and status in ('failed', 'unreachable'):
            record['ignored'] = True

        counts = self._host(record['host'])
        counts[status] += 1
        counts['ignored'] += bool(record.get('ignored'))
        self._results.append(record)

        findings = [] if hidden else normalize_findings(data.get('drift_findings'))
        marked = name.lower().startswith('drift:') or 'drift' in (getattr(task, 'tags', None) or [])
        if status == 'changed' or findings or (status == 'failed' and marked):
            counts['drift'] += 1
            self._drift.append(self._drift_entry(record, data, hidden, findings))
        elif status in ('failed', 'unreachable') and not ignored:
            counts['errors'] += 1
            error = dict(record)
            error['msg'] = HIDDEN if hidden else _truncate(_as_text(data.get('msg') or data.get('reason') or ''), MSG_LIMIT)
            if not hidden and isinstance(data.get('stderr'), str) and data['stderr']:
                error['stderr'] = data['stderr'][-MSG_LIMIT:]
            self._errors.append(error)

    @staticmethod
    def _drift_entry(record: dict[str, Any], data: Mapping[str, Any], hidden: bool, findings: list[Any]) -> dict[str, Any]:
        entry = dict(record)
        if hidden:
            entry.update(kind='changed' if record['status'] == 'changed' else 'check_failed', summary=HIDDEN, diffs=[])
            return entry
        diffs = normalize_diffs(data['diff']) if record['status'] == 'changed' and data.get('diff') else []
        if record['status'] == 'changed':
            kind, summary = 'changed', change_summary(record['action'], data, diffs, record.get('item'))
        elif findings:
            kind = 'findings'
            summary = f'{len(findings)} finding(s): ' + '; '.join(_finding_text(f) for f in findings[:5])
        else:
            kind, summary = 'check_failed', _one_line(data.get('msg') or 'the check failed', 500)
        entry.update(kind=kind, summary=summary, diffs=diffs)
        if findings:
            entry['findings'] = findings
        return entry

    # -- output --------------------------------------------------------------------------------

    def build_report(self) -> dict[str, Any]:
        """The report as a dict, redacted and with every string capped."""
        args: Mapping[str, Any] = context.CLIARGS if context is not None else {}
        errors, drift = len(self._errors), len(self._drift)
        coverage = self.coverage()
        hosts = {host: dict(self._host(host), **coverage[host]) for host in coverage}
        statuses = [c['status'] for c in coverage.values()]
        report = {
            'format': 2,
            'started': self._started,
            'finished': _now(),
            'playbooks': self._playbooks or [str(p) for p in args.get('args', ())],
            'inventory': [str(i) for i in args.get('inventory') or ()],
            'limit': args.get('subset'),
            'check_mode': bool(args.get('check')),
            'diff_mode': bool(args.get('diff')),
            'summary': {
                # A host not fully checked is an error: what was not checked may drift too.
                'status': 'error' if errors or any(s != CHECKED for s in statuses) else 'drift' if drift else 'clean',
                'hosts': len(hosts),
                'checked': statuses.count(CHECKED),
                'partially_checked': statuses.count(PARTIALLY_CHECKED),
                'not_checked': statuses.count(NOT_CHECKED),
                'drift': drift,
                'errors': errors,
            },
            'plays': [{k: entry[k] for k in ('index', 'name', 'hosts', 'playbook')} for entry in self._plays],
            'hosts': hosts,
            'drift': self._drift,
            'errors': self._errors,
            'results': self._results,
        }
        return _cap_strings(redact(report))

    def write_report(self, report_dir: str) -> None:
        report = self.build_report()
        os.makedirs(report_dir, exist_ok=True)
        _write(os.path.join(report_dir, 'drift-report.json'), json.dumps(report, indent=2, ensure_ascii=False, default=str) + '\n')
        markdown = render_markdown(report, int(self.get_option('max_diff_lines')))
        # Rendering joins strings into new lines: redact the result once more.
        _write(os.path.join(report_dir, 'drift-report.md'), redact_text(markdown))


def _write(path: str, text: str) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)

