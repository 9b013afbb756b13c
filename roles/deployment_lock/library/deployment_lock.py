#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: deployment_lock
short_description: Take or release a host's deployment lock; append a line to its audit trail
description:
  - One operator at a time. A run takes the lock (O(state=present)) on every host it changes
    before it changes anything, and releases it (O(state=absent)) at its end. The
    C(deployment_lock) callback plugin of this repository releases it whatever the result of the
    run; the C(deployment_lock) role takes it.
  - The lock is a JSON file at O(path) that names its holder. It records the run id, the operator,
    the controller's host name and a hash of its machine id, the process of the run on the controller
    (C(pid:start time)), the playbook, the limit and, on the host's clock, since when it is held.
  - It is written atomically. The record is written to a private temporary file next to O(path),
    flushed to disk and hard-linked to O(path). A link never replaces an existing file, so two runs can
    never both win. All of the module's reads and writes of the lock also take turns under an
    exclusive C(fcntl.flock) of the lock's directory, held for milliseconds. A run waits at most
    10 seconds for that, never for the lock itself.
  - A lock held by another run is refused at once, with its holder in the message and in RV(holder).
    Nothing is changed.
  - Breaking a lock needs O(break_stale=true), and the lock must be stale. It is stale when it is
    older than O(stale_age) seconds, or when its holder ran on this same controller (same machine id,
    else same host name) and its process is gone (not in the C(live_runs) of O(run)). A lock whose
    run is still running on this controller is never broken. A corrupt lock file (not a JSON object
    with a run id and a time, or not a regular file) is refused like a held lock and can be broken
    with O(break_stale=true). A broken lock is replaced atomically by this run's, which records what it
    broke (RV(previous)).
  - Taking a lock this run already holds (the same run id) is a no-op.
  - O(state=absent) removes the lock only when this run holds it; a lock that another run took (after
    breaking this one) or a corrupt one is left alone, with a warning. With O(audit_entry), it first
    appends the entry as one JSON line to O(audit_path), creating the file (mode C(0640)) and its
    directory (mode C(0755)) when missing.
  - Check mode reports what would happen and writes nothing.
version_added: "1.0.0"
author:
  - AI system provisioning team (@ai-system-provisioning)
requirements:
  - python >= 3.6 on the host, Linux (C(fcntl.flock), hard links on the lock's file system)
options:
  path:
    description: The lock file. Its directory is created (mode C(0755)) when missing.
    type: path
    required: true
  state:
    description: V(present) takes the lock, V(absent) releases it.
    type: str
    choices: [present, absent]
    default: present
  host:
    description: The host's name in the inventory, for messages and the lock's record (default the host's own name).
    type: str
  run:
    description:
      - The run that takes or releases the lock, as the C(deployment_lock) callback describes it (the
        C(AI_DEPLOY_RUN) environment variable of the controller, JSON).
      - C(run_id) is required. C(operator), C(controller), C(controller_id), C(pid), C(process),
        C(playbook), C(limit) and C(started) are recorded in the lock. C(live_runs) lists the
        processes (C(pid:start time)) of the runs alive on the controller, to judge whether a holder
        on the same controller is gone; null when the controller cannot tell.
    type: dict
    required: true
  break_stale:
    description: Break a stale or corrupt lock held by another run (see the description).
    type: bool
    default: false
  stale_age:
    description: Seconds after which a lock counts as stale whoever holds it (unless its run is alive on this controller).
    type: int
    default: 7200
  audit_path:
    description: The audit trail, one JSON object per line. Used with O(audit_entry).
    type: path
  audit_entry:
    description: With O(state=absent), the entry to append to O(audit_path) before the lock is released.
    type: dict
notes:
  - The lock's age is measured on the host's clock only (when it was taken and now), so clock
    differences between the controller and the hosts do not matter.
'''

EXAMPLES = r'''
- name: Take the deployment lock
  deployment_lock:
    path: /var/lib/ai-system/deploy.lock
    run: "{{ lookup('ansible.builtin.env', 'AI_DEPLOY_RUN') | from_json }}"
    break_stale: "{{ ai_deploy_lock_break }}"

- name: Release it and record the run
  deployment_lock:
    path: /var/lib/ai-system/deploy.lock
    state: absent
    run: {run_id: 20261128T044012Z-laptop-4242-3f9a}
    audit_path: /var/log/ai-system/deployments.jsonl
    audit_entry: {time: "2026-11-28T04:41:30Z", result: success}
'''

RETURN = r'''
deployment_lock:
  description: What this run holds after the task (the callback plugin reads it).
  returned: success
  type: dict
  contains:
    path: {description: The lock file., type: str}
    run_id: {description: This run's id., type: str}
    state: {description: V(held) or V(released); V(checked) in check mode (nothing was written)., type: str}
    audit_path: {description: O(audit_path)., type: str}
holder:
  description: The lock as found (also on failure, when another run holds it); null when there was none or it is corrupt.
  returned: always
  type: dict
lock:
  description: The lock this run wrote or holds (O(state=present)).
  returned: success
  type: dict
previous:
  description: The lock this run broke (its record, or C(corrupt) with the reason), else null.
  returned: success
  type: dict
verdict:
  description: How the holder was judged, V(none), V(own), V(live), V(held), V(gone), V(stale) or V(corrupt).
  returned: always
  type: str
released:
  description: Whether O(state=absent) removed this run's lock.
  returned: when O(state=absent)
  type: bool
audit_written:
  description: Whether a line was appended to O(audit_path).
  returned: when O(state=absent)
  type: bool
'''

import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule

GUARD_TIMEOUT = 10.0
MAX_LOCK_BYTES = 65536
RECORDED = ('run_id', 'operator', 'controller', 'controller_id', 'pid', 'process', 'playbook', 'limit', 'started')


def utc_iso(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def human_age(seconds):
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return '%d s' % seconds
    if seconds < 7200:
        return '%d min' % (seconds // 60)
    return '%d h %d min' % (seconds // 3600, seconds % 3600 // 60)


class Guard(object):
    """Exclusive flock of the lock's directory: the module's reads and writes take turns."""

    def __init__(self, directory, timeout=GUARD_TIMEOUT):
        self.directory = directory
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.directory, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise TimeoutError('could not take turns on %s within %d s' % (self.directory, self.timeout))
            time.sleep(0.02)

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the flock
        return False


def read_lock(path):
    """('absent'|'ok'|'corrupt', record or None, reason or None, mtime or None)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return 'absent', None, None, None
        raise
    if not stat.S_ISREG(st.st_mode):
        kind = 'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a regular file'
        return 'corrupt', None, kind, st.st_mtime
    with open(path, 'rb') as f:
        raw = f.read(MAX_LOCK_BYTES + 1)
    if not raw.strip():
        return 'corrupt', None, 'empty', st.st_mtime
    if len(raw) > MAX_LOCK_BYTES:
        return 'corrupt', None, 'larger than %d bytes' % MAX_LOCK_BYTES, st.st_mtime
    try:
        record = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError):
        return 'corrupt', None, 'not JSON (%d bytes)' % len(raw), st.st_mtime
    if not isinstance(record, dict):
        return 'corrupt', None, 'not a JSON object', st.st_mtime
    if not isinstance(record.get('run_id'), str) or not record['run_id']:
        return 'corrupt', None, 'no run_id', st.st_mtime
    if not isinstance(record.get('since_epoch'), (int, float)) or isinstance(record.get('since_epoch'), bool):
        return 'corrupt', None, 'no since_epoch', st.st_mtime
    return 'ok', record, None, st.st_mtime


def same_controller(holder, run):
    if holder.get('controller_id') and run.get('controller_id'):
        return holder['controller_id'] == run['controller_id']
    return bool(holder.get('controller')) and holder.get('controller') == run.get('controller')


def judge(holder, run, now, stale_age):
    """(verdict, age in seconds): own, live, gone, stale or held."""
    age = max(now - holder['since_epoch'], 0)
    if holder['run_id'] == run['run_id']:
        return 'own', age
    live = run.get('live_runs')
    if holder.get('process') and isinstance(live, list) and same_controller(holder, run):
        return ('live' if holder['process'] in live else 'gone'), age
    return ('stale' if age >= stale_age else 'held'), age


def describe(holder, age):
    who = '%s on controller %s' % (holder.get('operator') or '?', holder.get('controller') or '?')
    if holder.get('pid'):
        who += ' (pid %s)' % holder['pid']
    what = 'playbook %s, limit %s' % (holder.get('playbook') or '?', holder.get('limit') or 'none')
    return 'run %s by %s, %s, since %s (%s ago)' % (holder['run_id'], who, what,
                                                     holder.get('since') or utc_iso(holder['since_epoch']), human_age(age))


def dump_synced(record, f):
    """RECORD as JSON into the open file F, flushed to disk."""
    json.dump(record, f, indent=1, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())


def write_new(path, record):
    """Write RECORD atomically at PATH; False if PATH appeared meanwhile (never replaces it)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix='.%s.' % os.path.basename(path), suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'w') as f:
            os.fchmod(f.fileno(), 0o644)
            dump_synced(record, f)
        try:
            os.link(tmp, path)
        except OSError as e:
            if e.errno == errno.EEXIST:
                return False
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # No hard links on this file system: exclusive create (readers take turns under the guard).
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as e2:
                if e2.errno == errno.EEXIST:
                    return False
                raise
            with os.fdopen(out, 'w') as f:
                dump_synced(record, f)
        return True
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        sync_dir(directory)


def replace(path, record):
    """Replace whatever is at PATH with RECORD, atomically (a rename)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix='.%s.' % os.path.basename(path), suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'w') as f:
            os.fchmod(f.fileno(), 0o644)
            dump_synced(record, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    sync_dir(directory)


def sync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(path, entry):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o755, exist_ok=True)
    line = json.dumps(entry, sort_keys=False, default=str) + '\n'
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o640)
    try:
        os.write(fd, line.encode('utf-8'))  # one write: lines of concurrent writers never interleave
        os.fsync(fd)
    finally:
        os.close(fd)


def acquire(module, path, run):
    p = module.params
    now = time.time()
    result = dict(changed=False, holder=None, previous=None, verdict='none')
    status, holder, reason, mtime = read_lock(path)
    result['holder'] = holder
    mine = dict((k, run.get(k)) for k in RECORDED)
    mine.update(version=1, since_epoch=now, since=utc_iso(now), host=p['host'] or socket.gethostname())

    if status == 'absent':
        if not module.check_mode and not write_new(path, mine):
            # Another writer that does not take turns won between the read and the link.
            status, holder, reason, mtime = read_lock(path)
            result['holder'] = holder
            if status == 'absent':
                module.fail_json(msg='The deployment lock %s appeared and vanished while this run took it; run again.' % path, **result)
        if status == 'absent':
            result.update(changed=True, lock=mine)
            return result

    if status == 'corrupt':
        result['verdict'] = 'corrupt'
        where = 'The deployment lock file %s on %s is corrupt (%s, modified %s).' % (
            path, p['host'] or socket.gethostname(), reason, utc_iso(mtime) if mtime else '?')
        if not p['break_stale']:
            module.fail_json(msg='%s Nothing was changed. It is not a lock this role wrote, so nobody can be shown to hold '
                                 'it: look at it, then break it with -e ai_deploy_lock_break=true.' % where, **result)
        result['previous'] = dict(corrupt=reason)
    else:
        verdict, age = judge(holder, run, now, p['stale_age'])
        result['verdict'] = verdict
        if verdict == 'own':
            result['lock'] = holder
            return result
        held = 'The deployment lock on %s is held by %s.' % (p['host'] or socket.gethostname(), describe(holder, age))
        if verdict == 'live':
            module.fail_json(msg='%s That run is still running on this controller: wait for it to end. Nothing was changed.'
                             % held, **result)
        if not p['break_stale']:
            if verdict == 'gone':
                hint = ('That run is gone (no such process on this controller): break the lock with '
                        '-e ai_deploy_lock_break=true.')
            elif verdict == 'stale':
                hint = ('It is older than %s (ai_deploy_lock_stale_age): if that run is gone, break the lock with '
                        '-e ai_deploy_lock_break=true.' % human_age(p['stale_age']))
            else:
                hint = ('Wait for it to end. If that run is gone, -e ai_deploy_lock_break=true breaks the lock once it is '
                        'older than %s (ai_deploy_lock_stale_age), or at once from the controller it ran on.'
                        % human_age(p['stale_age']))
            module.fail_json(msg='%s Nothing was changed. %s' % (held, hint), **result)
        if verdict == 'held':
            module.fail_json(msg='%s Nothing was changed. It is not stale: younger than %s (ai_deploy_lock_stale_age) and not '
                                 'from a run that is gone on this controller, so it cannot be broken yet.'
                             % (held, human_age(p['stale_age'])), **result)
        result['previous'] = dict((k, holder.get(k)) for k in RECORDED + ('since',))

    mine['broke'] = result['previous']
    if not module.check_mode:
        replace(path, mine)
    result.update(changed=True, lock=mine)
    return result


def release(module, path, run, audit_path, audit_entry):
    result = dict(changed=False, released=False, audit_written=False, holder=None, verdict='none')
    status, holder, reason, dummy = read_lock(path)
    result['holder'] = holder
    if audit_entry is not None:
        if not audit_path:
            module.fail_json(msg='audit_entry needs audit_path', **result)
        if not module.check_mode:
            append_line(audit_path, audit_entry)
        result.update(changed=True, audit_written=True)
    if status == 'ok' and holder['run_id'] == run['run_id']:
        result['verdict'] = 'own'
        if not module.check_mode:
            os.unlink(path)
            sync_dir(os.path.dirname(path))
        result.update(changed=True, released=True)
    elif status == 'ok':
        result['verdict'] = 'held'
        module.warn('The deployment lock %s is now held by run %s (this run\'s lock was broken); left alone.'
                    % (path, holder['run_id']))
    elif status == 'corrupt':
        result['verdict'] = 'corrupt'
        module.warn('The deployment lock %s is corrupt (%s); left alone.' % (path, reason))
    else:
        module.warn('The deployment lock %s was already gone (broken and released by another run?).' % path)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type='path', required=True),
            state=dict(type='str', choices=['present', 'absent'], default='present'),
            run=dict(type='dict', required=True),
            break_stale=dict(type='bool', default=False),
            stale_age=dict(type='int', default=7200),
            audit_path=dict(type='path'),
            audit_entry=dict(type='dict'),
            host=dict(type='str'),
        ),
        supports_check_mode=True,
    )
    p = module.params
    run = p['run']
    if not isinstance(run.get('run_id'), str) or not run['run_id']:
        module.fail_json(msg='No run id. The deployment_lock callback plugin describes each run (AI_DEPLOY_RUN); enable it '
                             '(callbacks_enabled in ansible.cfg) so that the lock is released at the end of every run.')
    if p['stale_age'] < 0:
        module.fail_json(msg='stale_age must be >= 0, got %d' % p['stale_age'])
    path = p['path']
    directory = os.path.dirname(path) or '.'
    path = os.path.join(directory, os.path.basename(path))
    if not os.path.isdir(directory):
        if p['state'] == 'absent' or module.check_mode:
            result = dict(changed=False, holder=None, verdict='none')
            if p['state'] == 'absent':
                result.update(released=False, audit_written=False)
                if p['audit_entry'] is not None and p['audit_path']:
                    if not module.check_mode:
                        append_line(p['audit_path'], p['audit_entry'])
                    result.update(changed=True, audit_written=True)
            else:
                result['changed'] = True
            result['deployment_lock'] = dict(path=path, run_id=run['run_id'], audit_path=p['audit_path'],
                                             state='released' if p['state'] == 'absent' else 'checked')
            module.exit_json(**result)
        os.makedirs(directory, 0o755, exist_ok=True)

    try:
        with Guard(directory):
            if p['state'] == 'present':
                result = acquire(module, path, run)
            else:
                result = release(module, path, run, p['audit_path'], p['audit_entry'])
    except TimeoutError as e:
        module.fail_json(msg='Deployment lock %s: %s. Nothing was changed.' % (path, e))
    except OSError as e:
        module.fail_json(msg='Deployment lock %s: %s' % (path, e))
    if module.check_mode:
        state = 'checked'  # nothing was written: nothing to release
    else:
        state = 'held' if p['state'] == 'present' else 'released'
    result['deployment_lock'] = dict(path=path, run_id=run['run_id'], audit_path=p['audit_path'], state=state)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
