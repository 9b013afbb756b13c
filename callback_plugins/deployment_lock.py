# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Describe each run for the deployment lock; at its end, whatever its result, release the
locks it holds and append its line to each changed host's audit trail."""

from __future__ import annotations

import atexit
import datetime
import getpass
import hashlib
import json
import os
import secrets
import socket
import sys
import time
from typing import Any

from ansible import constants as C
from ansible import context
from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: deployment_lock
type: notification
short_description: Release a run's deployment locks at its end, whatever its result, and write the audit trail
description:
  - "At the start of each playbook it describes the run in the controller's environment variable
    C(AI_DEPLOY_RUN) (JSON): a run id, the operator (C(AI_DEPLOY_OPERATOR), else C(SUDO_USER), else the
    invoking user), the controller's host name and a hash of its machine id, the run's process
    (C(pid:start time)), the playbook (relative to the project), the limit, the start time, and the
    processes of the Ansible runs alive on this controller (C(live_runs)), by which a lock's holder on
    this controller is known to be gone. The C(deployment_lock) role hands it to the
    C(deployment_lock) module, which takes the lock on each host."
  - "It notes every host on which this run took the lock (results of the C(deployment_lock) module with
    this run's id), and the audit details the C(deployment_lock) role's C(record) entry point sets
    (the fact C(deployment_lock_record))."
  - "At the end of the playbook (C(v2_playbook_on_stats)), after a success or a failure alike, also
    after C(any_errors_fatal) stopped the run and when a host became unreachable, it runs one task on
    every host that holds this run's lock, through Ansible itself (same inventory, variables,
    connection, become and passwords): it appends one JSON line to the host's audit trail when the run
    changed that host (or the host's recorded deploy failed, or the run broke a stale lock there), then
    removes the lock if it is still this
    run's. A run interrupted by Ctrl-C, or stopped by an error of Ansible itself, does the same when
    the controller process exits. Only a killed controller process leaves its locks behind; its run is
    then gone, and C(-e ai_deploy_lock_break=true) breaks them."
  - In check mode nothing is locked, so nothing is released.
author:
  - AI system provisioning team (@ai-system-provisioning)
requirements:
  - Enable it in C(callbacks_enabled) (C(ansible.cfg) of this repository does).
notes:
  - "An audit line: time, host, run_id, operator, controller, playbook, limit, started, action,
    result (of this host: success or failed), run_result (of the run: success, failed or interrupted),
    changed (tasks that changed the host), images (image, tag, digest), services (name: state),
    rolled_back, detail, lock_broken (the lock this run broke, if any)."
"""

ENV = 'AI_DEPLOY_RUN'
MODULE = 'deployment_lock'
RECORD_FACT = 'deployment_lock_record'
ROLE_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'roles', 'deployment_lock', 'library')


def utc_iso(epoch: float | None = None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if epoch is None else epoch, datetime.timezone.utc)
    return moment.strftime('%Y-%m-%dT%H:%M:%SZ')


def process_token(pid: int) -> str | None:
    """'pid:start time' (clock ticks since boot): names one process, never a later one with the same pid."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            stat = f.read().decode('utf-8', 'replace')
    except OSError:
        return None
    fields = stat.rsplit(')', 1)[-1].split()
    return f'{pid}:{fields[19]}' if len(fields) > 19 else None


def live_runs() -> list[str] | None:
    """Tokens of the Ansible processes alive on this controller; None where /proc cannot tell."""
    if not os.path.isdir('/proc/self') or (os.geteuid() != 0 and proc_hides_processes()):
        return None
    tokens = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open(f'/proc/{name}/cmdline', 'rb') as f:
                if b'ansible' not in f.read():
                    continue
        except OSError:
            continue
        token = process_token(int(name))
        if token:
            tokens.append(token)
    return tokens


def proc_hides_processes() -> bool:
    """/proc mounted with hidepid: other users' runs are invisible, so a gone run cannot be told from a hidden one."""
    try:
        with open('/proc/self/mounts', encoding='utf-8') as f:
            return any(line.split()[1] == '/proc' and 'hidepid=' in line for line in f if len(line.split()) > 3)
    except OSError:
        return True


def controller_id() -> str | None:
    """A hash of the machine id (the id itself is confidential): tells controllers with one name apart."""
    for path in ('/etc/machine-id', '/var/lib/dbus/machine-id'):
        try:
            with open(path, encoding='ascii') as f:
                machine = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if machine:
            return hashlib.sha256(('ai-deploy-lock:' + machine).encode()).hexdigest()[:16]
    return None


def project_relative(path: str | None) -> str | None:
    if not path:
        return path
    base = os.path.dirname(C.CONFIG_FILE) if C.CONFIG_FILE else os.getcwd()
    path = os.path.abspath(path)
    rel = os.path.relpath(path, base)
    return path if rel.startswith(os.pardir) else rel


def describe_run(playbook: str | None) -> dict[str, Any]:
    now = time.time()
    controller = socket.gethostname()
    pid = os.getpid()
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    return {
        'run_id': f"{stamp}-{controller.split('.')[0]}-{pid}-{secrets.token_hex(3)}",
        'operator': os.environ.get('AI_DEPLOY_OPERATOR') or os.environ.get('SUDO_USER') or getpass.getuser(),
        'controller': controller,
        'controller_id': controller_id(),
        'pid': pid,
        'process': process_token(pid),
        'playbook': project_relative(playbook),
        'limit': context.CLIARGS.get('subset') or None,
        'started': utc_iso(now),
        'live_runs': live_runs(),
    }


def image_list(images: Any) -> list[dict[str, str]]:
    """{reference: digest} (or a list of references) -> [{image, tag, digest}]."""
    if isinstance(images, dict):
        pairs = list(images.items())
    elif isinstance(images, list):
        pairs = [(ref, '') for ref in images]
    else:
        pairs = []
    listed = []
    for ref, digest in pairs:
        ref = str(ref)
        name = ref.split('@', 1)[0]
        tag = name.rsplit(':', 1)[1] if ':' in name.rsplit('/', 1)[-1] else 'latest'
        listed.append({'image': ref, 'tag': tag, 'digest': str(digest or '')})
    return listed


def audit_entry(run: dict[str, Any], host: str, summary: dict[str, int], record: dict[str, Any] | None,
                held: dict[str, Any], run_result: str) -> dict[str, Any]:
    record = record or {}
    failed = summary.get('failures', 0) > 0 or summary.get('unreachable', 0) > 0 or record.get('result') == 'failed'
    return {
        'time': utc_iso(),
        'host': host,
        'run_id': run['run_id'],
        'operator': run['operator'],
        'controller': run['controller'],
        'playbook': run['playbook'],
        'limit': run['limit'],
        'started': run['started'],
        'action': record.get('action'),
        'result': 'failed' if failed else ('interrupted' if run_result == 'interrupted' else 'success'),
        'run_result': run_result,
        'changed': summary.get('changed', 0),
        'images': image_list(record.get('images')),
        'services': dict(record.get('services') or {}),
        'rolled_back': bool(record.get('rolled_back', False)),
        'detail': str(record.get('detail') or ''),
        'lock_broken': held.get('previous'),
    }


def find_task_queue_manager() -> Any:
    """The TaskQueueManager that is calling us: the release runs with its inventory, variables and passwords."""
    from ansible.executor.task_queue_manager import TaskQueueManager

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get('self')
        if isinstance(candidate, TaskQueueManager):
            return candidate
        frame = frame.f_back
    return None


def trusted(template: str) -> str:
    try:
        from ansible.template import trust_as_template
    except ImportError:  # ansible-core < 2.19 templates every string of a play
        return template
    return trust_as_template(template)


class ReleaseResults(CallbackBase):
    """The release play's only callback: it collects each host's result and prints nothing."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'stdout'
    CALLBACK_NAME = 'deployment_lock_release'

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[str, tuple[str, dict[str, Any]]] = {}

    def _keep(self, status: str, result: Any) -> None:
        self.results[result.host.get_name()] = (status, dict(getattr(result, 'result', None) or result._result))

    def v2_runner_on_ok(self, result: Any) -> None:
        self._keep('ok', result)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._keep('failed', result)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._keep('unreachable', result)


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'notification'
    CALLBACK_NAME = 'deployment_lock'
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, display: Any = None) -> None:
        super().__init__(display=display)
        self.run: dict[str, Any] | None = None
        self.tqm: Any = None
        self.held: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}
        atexit.register(self._at_exit)

    # -- the run -------------------------------------------------------------------------------

    def v2_playbook_on_start(self, playbook: Any) -> None:
        self.tqm = find_task_queue_manager()
        self.held, self.records = {}, {}
        self.run = describe_run(getattr(playbook, '_file_name', None))
        os.environ[ENV] = json.dumps(self.run)

    def v2_runner_on_ok(self, result: Any) -> None:
        if self.run is None:
            return
        data = getattr(result, 'result', None) or result._result
        host = result.host.get_name()
        lock = data.get('deployment_lock')
        if isinstance(lock, dict) and lock.get('run_id') == self.run['run_id']:
            if lock.get('state') == 'held':
                self.held[host] = {'path': lock.get('path'), 'audit_path': lock.get('audit_path'),
                                   'previous': self.held.get(host, {}).get('previous') or data.get('previous')}
            elif lock.get('state') == 'released':
                self.held.pop(host, None)
        facts = data.get('ansible_facts')
        if isinstance(facts, dict) and isinstance(facts.get(RECORD_FACT), dict):
            self.records[host] = facts[RECORD_FACT]

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._finish(stats, interrupted=False)

    def _at_exit(self) -> None:
        if not self.held:
            return
        try:
            self._finish(getattr(self.tqm, '_stats', None), interrupted=True)
        except Exception as e:  # never hide why the run stopped
            self._display.warning(f'deployment_lock: could not release the deployment locks at exit: {e}')

    # -- the release ---------------------------------------------------------------------------

    def _finish(self, stats: Any, interrupted: bool) -> None:
        held, self.held = self.held, {}
        if not held or self.run is None:
            return
        summaries = {host: (stats.summarize(host) if stats is not None else {}) for host in held}
        all_hosts = set(getattr(stats, 'processed', {}) or {})
        run_failed = any((stats.failures.get(h, 0) or stats.dark.get(h, 0)) for h in all_hosts) if stats is not None else True
        run_result = 'interrupted' if interrupted else ('failed' if run_failed else 'success')

        releases = {}
        for host, lock in held.items():
            record = self.records.get(host)
            # A broken lock is worth a line even when nothing else changed.
            changed = (summaries[host].get('changed', 0) > 0 or (record or {}).get('result') == 'failed'
                       or bool(lock.get('previous')))
            entry = audit_entry(self.run, host, summaries[host], record, lock, run_result) if changed else None
            releases[host] = {'path': lock['path'], 'state': 'absent', 'run': {'run_id': self.run['run_id']},
                              'audit_path': lock['audit_path'] if entry else None, 'audit_entry': entry}

        if self.tqm is None:
            self._display.warning('deployment_lock: no task queue manager to release the deployment locks with; they stay '
                                  f"on {', '.join(sorted(releases))} until broken (-e ai_deploy_lock_break=true).")
            return
        try:
            results = self._run_release(releases)
        except Exception as e:
            self._display.warning(f"deployment_lock: releasing the deployment locks on {', '.join(sorted(releases))} "
                                  f'failed ({e}); they stay until broken (-e ai_deploy_lock_break=true).')
            return
        self._report(releases, results)

    def _run_release(self, releases: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
        from ansible.executor.task_queue_manager import TaskQueueManager
        from ansible.playbook.play import Play
        from ansible.plugins.loader import module_loader

        module_loader.add_directory(os.path.abspath(ROLE_LIBRARY))
        outer = self.tqm
        inventory, variable_manager, loader = outer._inventory, outer._variable_manager, outer._loader
        # serial plays leave the inventory restricted to their last batch
        inventory.remove_restriction()
        args = {key: trusted('{{ deployment_lock_release[inventory_hostname].%s }}' % key)
                for key in ('path', 'state', 'run', 'audit_path', 'audit_entry')}
        play = Play().load({
            'name': 'Release the deployment lock',
            'hosts': sorted(releases),
            'gather_facts': False,
            'vars': {'deployment_lock_release': releases},
            'tasks': [{
                'name': 'Append the audit line and release the deployment lock',
                MODULE: args,
                'check_mode': False,
                'ignore_unreachable': True,
                # run whatever --tags or --start-at-task the run was given
                'tags': ['always'],
            }],
        }, variable_manager=variable_manager, loader=loader)
        collector = ReleaseResults()
        collector._init_callback_methods()
        tqm = TaskQueueManager(inventory=inventory, variable_manager=variable_manager, loader=loader,
                               passwords=getattr(outer, 'passwords', None) or getattr(outer, '_passwords', {}),
                               forks=getattr(outer, '_forks', None))
        tqm._callback_plugins = [collector]  # nothing else: no play banner, no recap, no timing of its own
        tqm._start_at_done = True
        try:
            tqm.run(play)
        finally:
            tqm.cleanup()
        return collector.results

    def _report(self, releases: dict[str, dict[str, Any]], results: dict[str, tuple[str, dict[str, Any]]]) -> None:
        released, audited, kept = [], [], []
        for host in sorted(releases):
            status, data = results.get(host, ('missing', {}))
            if status == 'ok':
                if data.get('released'):
                    released.append(host)
                for warning in data.get('warnings') or []:
                    self._display.warning(f'deployment_lock on {host}: {warning}')
                if data.get('audit_written'):
                    audited.append(host)
            else:
                reason = data.get('msg') or status
                kept.append(host)
                self._display.warning(f'deployment_lock: could not release the deployment lock on {host} ({reason}). '
                                      'It stays until it is broken: -e ai_deploy_lock_break=true.')
        run_id = self.run['run_id'] if self.run else '?'
        if released or audited:
            line = f"Deployment lock of run {run_id} released on {', '.join(released) or 'no host'}"
            line += f"; audit line written on {', '.join(audited)}." if audited else '; no host changed, no audit line.'
            self._display.display(line)
