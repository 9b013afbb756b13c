# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the deployment_lock role: the audit trail as a table."""

from __future__ import annotations

import json

COLUMNS = ('TIME', 'HOST', 'OPERATOR@CONTROLLER', 'PLAYBOOK (ACTION)', 'LIMIT', 'RESULT', 'ROLLED BACK', 'IMAGES', 'SERVICES')


def _services(services: object) -> str:
    if not isinstance(services, dict) or not services:
        return '-'
    bad = [f'{name}: {state}' for name, state in services.items() if state not in ('healthy', 'stopped')]
    if not bad:
        states = sorted(set(services.values()))
        return f"{len(services)}/{len(services)} {'/'.join(states)}"
    return f'{len(services) - len(bad)}/{len(services)} healthy; ' + ', '.join(bad)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return [' '.join(f'{cell:<{widths[i]}}' for i, cell in enumerate(row)).rstrip() for row in rows]


def deployment_history_table(lines_by_host: dict, entries: int = 20) -> list[str]:
    """The newest ENTRIES audit lines of all hosts ({host: [JSON line, ...]}), oldest first, as table rows."""
    parsed = []
    for host, lines in (lines_by_host or {}).items():
        last_time = ''
        for number, line in enumerate(lines or []):
            line = str(line).strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError('not an object')
            except ValueError:
                entry = {'host': host, 'result': '(unreadable line)'}
            # an unreadable line keeps its place after the entry before it
            last_time = str(entry.get('time') or last_time)
            parsed.append((last_time, host, number, entry))
    parsed.sort(key=lambda item: item[:3])
    rows = [list(COLUMNS)]
    for _, host, _, entry in parsed[-entries:] if entries > 0 else []:
        playbook = str(entry.get('playbook') or '-')
        if entry.get('action'):
            playbook += f" ({entry['action']})"
        who = f"{entry.get('operator') or '?'}@{entry.get('controller') or '?'}" if 'operator' in entry else '-'
        images = entry.get('images') or []
        tags = sorted({str(image.get('tag')) for image in images if isinstance(image, dict) and image.get('tag')})
        rows.append([
            str(entry.get('time') or '-'), str(entry.get('host') or host), who, playbook, str(entry.get('limit') or '-'),
            str(entry.get('result') or '-'), 'yes' if entry.get('rolled_back') else 'no' if 'rolled_back' in entry else '-',
            ','.join(tags) or '-', _services(entry.get('services')),
        ])
    if len(rows) == 1:
        return _table(rows) + ['(no deployments recorded)']
    return _table(rows)


class FilterModule:
    def filters(self):
        return {'deployment_history_table': deployment_history_table}
