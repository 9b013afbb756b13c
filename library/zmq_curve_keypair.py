#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: zmq_curve_keypair
short_description: Manage a CurveZMQ key pair in ZeroMQ's certificate format
description:
  - Creates, keeps, rotates or removes a CurveZMQ key pair stored as C(NAME.key) (public)
    and C(NAME.key_secret) (public and secret) in O(dir).
  - The files are written by pyzmq's C(zmq.auth.create_certificates), so C(zmq.auth.load_certificate)
    and a C(ThreadAuthenticator) configured with C(configure_curve) on O(dir) read them unchanged.
  - Idempotent. An existing valid pair is kept; wrong mode, owner or group on an existing pair is
    fixed without generating new keys.
  - A corrupt or half-present pair (one file missing, a file that cannot be parsed, or a public key in
    C(NAME.key) that differs from the one in C(NAME.key_secret)) is an error unless O(force=true).
  - Both files must be regular files. A symlink in place of C(NAME.key_secret) or C(NAME.key) is refused
    as an invalid pair, because the mode and owner the module manages would be those of the link, not
    of the file that holds the secret. O(force=true) replaces the link with a new pair of regular files
    and leaves the link's target alone. O(dir) itself may be a symlink to a directory.
  - New pairs are written atomically. They are created in a private temporary directory inside O(dir)
    with umask 077, get their final mode, owner and group there, are flushed to disk, and are then
    moved into place with a rename. The secret file is never readable by other users, not even briefly.
  - Runs on the same O(dir) take turns. From its first look at the pair to its last write, a run
    holds an C(fcntl.flock) on the empty file C(.zmq_curve_keypair.lock) in O(dir) (exclusive; shared
    in check mode). Concurrent runs therefore never leave or see a public key that does not match its
    secret. When the pair is missing, the first run makes it and the others find it and report
    C(changed=false). The lock file is created with mode C(0600) by the first run that is not in check
    mode, and it is never removed. It is hidden and does not end in C(.key), so a C(ThreadAuthenticator)
    ignores it. A run waits up to 60 seconds for the lock, then fails.
  - If O(dir) does not exist it is created with mode C(0700) (and O(owner)/O(group) when given),
    and the task reports C(changed).
  - The secret key never appears in results, diffs or error messages.
version_added: "1.0.0"
author:
  - AI system provisioning team (@ai-system-provisioning)
requirements:
  - python >= 3.6
  - pyzmq (Debian package C(python3-zmq)) with a libzmq built with CURVE support
options:
  dir:
    description:
      - Directory holding the key files (for the agents, the certificates directory that is mounted at
        C(/app/certificates)).
      - Created with mode C(0700) if missing.
    type: path
    required: true
  name:
    description:
      - Base name of the key pair, for example C(server) or C(client).
      - Must not be empty and must not contain C(/).
    type: str
    required: true
  state:
    description:
      - V(present) makes sure a valid pair exists; V(absent) removes both files.
    type: str
    choices: [present, absent]
    default: present
  force:
    description:
      - Generate a new key pair even if a valid one exists (key rotation), or replace a corrupt,
        half-present or symlinked pair.
      - With O(force=true) the task always reports C(changed) for O(state=present).
    type: bool
    default: false
  mode:
    description:
      - Permissions of the secret file C(NAME.key_secret), octal string or symbolic (as for M(ansible.builtin.file)).
    type: raw
    default: '0600'
  public_mode:
    description:
      - Permissions of the public file C(NAME.key).
    type: raw
    default: '0644'
  owner:
    description:
      - Owner of both files (and of O(dir) when the module creates it).
    type: str
  group:
    description:
      - Group of both files (and of O(dir) when the module creates it).
    type: str
attributes:
  check_mode:
    support: full
    description: >-
      Predicts the change without writing, creating or removing anything, not even the lock file.
      It reads the pair under a shared lock, so it never mistakes a half-written pair for a broken one.
  diff_mode:
    support: full
    description: Shows the presence of both files and the public key. The secret key is never shown.
notes:
  - The lock works between processes on one machine and for local file systems. Other programs that
    read the pair while the module rotates it (the agents, for example) do not take the lock. They
    may briefly see the new secret file next to the old public file, so restart them after a
    rotation, as the next note says.
  - Rotating the server pair (O(force=true)) requires restarting the servers and giving clients the
    new C(server.key); rotating a client pair changes the C(NAME.key) that servers' authenticators load.
seealso:
  - module: zmq_health
'''

EXAMPLES = r'''
- name: Server key pair shared by both machines
  zmq_curve_keypair:
    dir: /opt/ai-system/certificates
    name: server
    owner: "1000"
    group: "1000"

- name: Client key pair
  zmq_curve_keypair:
    dir: /opt/ai-system/certificates
    name: client
  register: client_keys

- name: Show the client public key (safe to show)
  ansible.builtin.debug:
    msg: "{{ client_keys.public_key }}"

- name: Rotate the client key pair
  zmq_curve_keypair:
    dir: /opt/ai-system/certificates
    name: client
    force: true

- name: Remove a retired client key pair (revokes it for ThreadAuthenticator)
  zmq_curve_keypair:
    dir: /opt/ai-system/certificates
    name: old-client
    state: absent
'''

RETURN = r'''
public_key:
  description:
    - The Z85 public key of the pair (40 characters).
    - V(null) when O(state=absent) or when a new pair would be generated in check mode.
  returned: always
  type: str
  sample: "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
public_key_file:
  description: Path of the public key file.
  returned: always
  type: str
  sample: /opt/ai-system/certificates/client.key
secret_key_file:
  description: Path of the secret key file (the path only, never its contents).
  returned: always
  type: str
  sample: /opt/ai-system/certificates/client.key_secret
generated:
  description: Whether a new key pair was (or, in check mode, would be) generated.
  returned: always
  type: bool
dir_created:
  description:
    - Whether O(dir) was (or, in check mode, would be) created by this run.
    - V(false) when a concurrent run created it first.
  returned: always
  type: bool
'''

import contextlib
import errno
import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.zmq_curve import (
    HAS_ZMQ,
    ZMQ_IMPORT_ERROR,
    CurveKeyError,
    create_keypair,
    has_curve,
    inspect_keypair,
    keypair_lock,
    keypair_lock_path,
    keypair_paths,
)


def _file_args(module, path, mode, owner, group):
    return module.load_file_common_arguments(dict(mode=mode, owner=owner, group=group), path=path)


def _diff_state(public_exists, secret_exists, public_key):
    """Diff view of a key pair: presence of both files and the public key, never the secret."""
    return dict(
        public_key_file_present=public_exists,
        secret_key_file_present=secret_exists,
        public_key=public_key,
    )


def _make_dir(module, directory, owner, group, result):
    """Create DIRECTORY with mode 0700; True if this run made it, False if a concurrent run was first."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        old_umask = os.umask(0o077)  # 0700 from the start, not after a chmod
        try:
            os.mkdir(directory, 0o700)
        finally:
            os.umask(old_umask)
    except OSError as e:
        if e.errno == errno.EEXIST and os.path.isdir(directory):
            return False
        module.fail_json(msg='cannot create dir %s: %s' % (directory, e.strerror), **result)
    if owner or group:
        module.set_fs_attributes_if_different(_file_args(module, directory, None, owner, group), True)
    return True


@contextlib.contextmanager
def _locked_pair(module, directory, name):
    """Inspect the pair under the lock: exclusive to change it, shared in check mode (never created)."""
    writer = not module.check_mode
    with keypair_lock(directory, exclusive=writer, create=writer) as locked:
        info = inspect_keypair(directory, name)
        if info['status'] == 'invalid' and not locked and os.path.lexists(keypair_lock_path(directory)):
            # A writer made the lock file after we looked and may be half-way: wait for it, look again.
            with keypair_lock(directory, exclusive=False, create=False):
                info = inspect_keypair(directory, name)
        yield info


def run_module(module):
    p = module.params
    directory = p['dir']
    name = p['name']
    state = p['state']
    owner, group = p['owner'], p['group']

    if not name or '/' in name or name in ('.', '..') or '\0' in name:
        module.fail_json(msg="name must be a non-empty file name without '/' (got %r)" % name)

    public_file, secret_file = keypair_paths(directory, name)
    result = dict(changed=False, public_key=None, public_key_file=public_file,
                  secret_key_file=secret_file, generated=False, dir_created=False)

    if os.path.exists(directory) and not os.path.isdir(directory):
        module.fail_json(msg='dir %s exists and is not a directory' % directory, **result)

    dir_exists = os.path.isdir(directory)
    if not dir_exists and state == 'present':
        if module.check_mode:
            result['dir_created'] = True
        else:
            # Another run may create it at the same time; only the run that made it reports it.
            result['dir_created'] = _make_dir(module, directory, owner, group, result)
            dir_exists = True
        result['changed'] = result['dir_created']

    try:
        if dir_exists:
            # Everything from the first look to the last write happens under the lock, so
            # concurrent runs take turns: the first makes the pair, the others find it.
            with _locked_pair(module, directory, name) as info:
                _apply(module, result, info)
        else:
            _apply(module, result, dict(status='absent', public_key=None, public_exists=False,
                                        secret_exists=False, message=None))
    except CurveKeyError as e:
        module.fail_json(msg=str(e), **result)


def _apply(module, result, info):
    """Bring the pair described by INFO to the wanted state and exit (called under the lock)."""
    p = module.params
    directory, name, state, force = p['dir'], p['name'], p['state'], p['force']
    owner, group = p['owner'], p['group']
    secret_mode, public_mode = p['mode'], p['public_mode']
    public_file, secret_file = result['public_key_file'], result['secret_key_file']

    before = _diff_state(info['public_exists'], info['secret_exists'], info['public_key'])

    # ---------------------------------------------------------------- absent
    if state == 'absent':
        existing = [f for f, present in ((secret_file, info['secret_exists']),
                                         (public_file, info['public_exists'])) if present]
        if existing:
            result['changed'] = True
            if not module.check_mode:
                for path in existing:  # a symlink is removed, never the file it points to
                    try:
                        os.unlink(path)
                    except OSError as e:
                        module.fail_json(msg='cannot remove %s: %s' % (path, e.strerror), **result)
        if module._diff:
            result['diff'] = dict(before=before, after=_diff_state(False, False, None))
        module.exit_json(**result)

    # --------------------------------------------------------------- present
    if info['status'] == 'invalid' and not force:
        module.fail_json(msg='invalid CURVE key pair %s in %s: %s (use force=true to replace it)'
                             % (name, directory, info['message']), **result)

    generate = force or info['status'] != 'valid'

    if generate:
        result['generated'] = True
        result['changed'] = True
        if not module.check_mode:
            def prepare(tmp_public, tmp_secret):
                module.set_fs_attributes_if_different(
                    _file_args(module, tmp_secret, secret_mode, owner, group), True)
                module.set_fs_attributes_if_different(
                    _file_args(module, tmp_public, public_mode, owner, group), True)
            try:
                result['public_key'] = create_keypair(directory, name, prepare=prepare)
            except CurveKeyError as e:
                module.fail_json(msg='cannot create key pair %s in %s: %s' % (name, directory, e), **result)
            except (IOError, OSError) as e:
                module.fail_json(msg='cannot create key pair %s in %s: %s'
                                     % (name, directory, e.strerror or type(e).__name__), **result)
        after = dict(public_key_file_present=True, secret_key_file_present=True,
                     public_key=result['public_key'] or '(new key, generated when applied)')
    else:
        result['public_key'] = info['public_key']
        # Both files are regular files here (inspect_keypair refuses symlinks), so the modes and
        # owners set below are those of the key files themselves.
        # set_fs_attributes_if_different only predicts in check mode.
        for path, mode in ((secret_file, secret_mode), (public_file, public_mode)):
            result['changed'] = module.set_fs_attributes_if_different(
                _file_args(module, path, mode, owner, group), result['changed'])
        after = dict(before)

    if module._diff:
        result['diff'] = dict(before=before, after=after)
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dir=dict(type='path', required=True),
            name=dict(type='str', required=True),
            state=dict(type='str', default='present', choices=['present', 'absent']),
            force=dict(type='bool', default=False),
            mode=dict(type='raw', default='0600'),
            public_mode=dict(type='raw', default='0644'),
            owner=dict(type='str'),
            group=dict(type='str'),
        ),
        supports_check_mode=True,
    )
    if not HAS_ZMQ:
        module.fail_json(msg=missing_required_lib('pyzmq (python3-zmq)'), exception=ZMQ_IMPORT_ERROR)
    if module.params['state'] == 'present' and not has_curve():
        module.fail_json(msg='the installed libzmq has no CURVE support (built without libsodium?)')
    try:
        run_module(module)
    except CurveKeyError as e:
        module.fail_json(msg=str(e))
    except Exception as e:  # never print a traceback that could carry key material
        module.fail_json(msg='unexpected error: %s: %s' % (type(e).__name__, e))


if __name__ == '__main__':
    main()
