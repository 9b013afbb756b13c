#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: managed_files
short_description: Compare many managed files and directories with their desired state, in one call
description:
  - Reads each path in O(paths) with C(lstat) and compares it with the state the role wants
    (type, mode, owner, group and, for files, the sha1 of the content). Returns which paths
    differ and why.
  - Read-only; it never changes a host and always reports C(changed=false).
  - Made for idempotent runs. A role asks once for all the files it manages, then runs its
    M(ansible.builtin.file), M(ansible.builtin.copy) or M(ansible.builtin.template) tasks only
    for the paths in RV(differ). Each of those tasks costs one or two module runs even when
    nothing changes. The tasks that do run keep their own check mode and C(--diff).
  - A symlink where a file or directory is wanted, a path that cannot be read, or a file that is
    not a regular file counts as differing, so the real task decides what to do with it.
  - Secret files may be compared by checksum (O(paths[].checksum)) but must not be read with
    O(paths[].read). The checksum of a file is returned only when it was asked for or the file is read.
version_added: "1.2.0"
author:
  - AI system provisioning team (@ai-system-provisioning)
requirements:
  - python >= 3.6
options:
  paths:
    description:
      - The paths to compare, each with its desired state. A property left out is not compared.
    type: list
    elements: dict
    required: true
    suboptions:
      path:
        description:
          - Absolute path on the host, as the role will look it up in RV(differ) and RV(paths);
            no C(~), no variables, no trailing C(/) (which would follow a symlink).
        type: str
        required: true
      state:
        description:
          - V(file) for a regular file, V(directory) for a directory, V(link) for a symbolic link
            (only its presence is compared, for example the link C(systemctl enable) makes).
        type: str
        choices: [file, directory, link]
        default: file
      mode:
        description:
          - Desired permissions as an octal string, for example V('0644').
          - An integer (an unquoted C(0644) in YAML) is read as M(ansible.builtin.file) reads it.
        type: raw
      owner:
        description: Desired owner, a user name or a numeric uid.
        type: str
      group:
        description: Desired group, a group name or a numeric gid.
        type: str
      checksum:
        description:
          - Desired sha1 of the file's content (40 hexadecimal digits), as
            C(content | hash('sha1')) computes it on the controller.
        type: str
      read:
        description:
          - Return the file's content (base64, as M(ansible.builtin.slurp) does) and its sha1.
          - For small files only (up to 1 MiB); never for secret files.
        type: bool
        default: false
notes:
  - Supports check mode; it runs the same in check mode.
seealso:
  - module: ansible.builtin.stat
  - module: ansible.builtin.find
'''

EXAMPLES = r'''
- name: Read the engine's files (the tasks below run only for the paths that differ)
  managed_files:
    paths:
      - {path: /etc/docker, state: directory, mode: "0755", owner: root, group: root}
      - {path: /etc/docker/daemon.json, mode: "0644", owner: root, group: root, read: true}
  register: engine_files

- name: Create /etc/docker
  ansible.builtin.file:
    path: /etc/docker
    state: directory
    mode: "0755"
  when: "'/etc/docker' in engine_files.differ"

- name: Write daemon.json
  ansible.builtin.copy:
    dest: /etc/docker/daemon.json
    content: "{{ daemon_json }}"
    mode: "0644"
  when: engine_files.paths['/etc/docker/daemon.json'].checksum | default('') != daemon_json | hash('sha1')
        or '/etc/docker/daemon.json' in engine_files.differ
'''

RETURN = r'''
differ:
  description: The paths that differ from their desired state (missing, other type, mode, owner, group or content).
  returned: always
  type: list
  elements: str
  sample: [/etc/docker/daemon.json]
paths:
  description: What was found at each path, keyed by path.
  returned: always
  type: dict
  sample:
    /etc/docker/daemon.json:
      exists: true
      type: file
      mode: "0644"
      owner: root
      group: root
      checksum: 1f8af42f5b7b82de95a1c47749d702b282cf6d7d
      content: eyJsb2ctZHJpdmVyIjogImxvY2FsIn0K
      differences: [content]
  contains:
    exists:
      description: Whether anything exists at the path (a broken symlink exists).
      type: bool
    type:
      description: V(file), V(directory), V(link) or V(other); absent when the path does not exist.
      type: str
    mode:
      description: Permissions as a four-digit octal string.
      type: str
    owner:
      description: Owner's user name, or the uid when it has no name.
      type: str
    group:
      description: Group name, or the gid when it has no name.
      type: str
    checksum:
      description: sha1 of a regular file's content, when a checksum was asked for or the file was read.
      type: str
    content:
      description: The file's content, base64-encoded, when O(paths[].read=true).
      type: str
    differences:
      description:
        - What differs; empty when the path is as desired. Each of V(missing), V(type),
          V(mode), V(owner), V(group), V(content), V(unreadable).
      type: list
      elements: str
'''

import base64
import grp
import hashlib
import os
import pwd
import re
import stat

from ansible.module_utils.basic import AnsibleModule

READ_LIMIT = 1024 * 1024
OCTAL_MODE = re.compile(r'^0?[0-7]{3,4}$')
SHA1 = re.compile(r'^[0-9a-f]{40}$')


def _name(lookup, ident):
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


def _matches_id(wanted, ident, name):
    """A desired owner/group given as a name or as a numeric id."""
    return wanted == name or (wanted.isdigit() and int(wanted) == ident)


def _kind(st):
    if stat.S_ISLNK(st.st_mode):
        return 'link'
    if stat.S_ISDIR(st.st_mode):
        return 'directory'
    if stat.S_ISREG(st.st_mode):
        return 'file'
    return 'other'


def inspect(spec):
    """What is at spec['path'] and how it differs from spec (see DOCUMENTATION)."""
    path = spec['path']
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {'exists': False, 'differences': ['missing']}
    except OSError:
        return {'exists': False, 'differences': ['unreadable']}
    found = {
        'exists': True,
        'type': _kind(st),
        'mode': '%04o' % stat.S_IMODE(st.st_mode),
        'owner': _name(pwd.getpwuid, st.st_uid),
        'group': _name(grp.getgrgid, st.st_gid),
    }
    differences = []
    if found['type'] != spec['state']:
        differences.append('type')
    if spec['mode'] is not None and int(spec['mode'], 8) != stat.S_IMODE(st.st_mode):
        differences.append('mode')
    if spec['owner'] is not None and not _matches_id(spec['owner'], st.st_uid, found['owner']):
        differences.append('owner')
    if spec['group'] is not None and not _matches_id(spec['group'], st.st_gid, found['group']):
        differences.append('group')
    if found['type'] == 'file' and (spec['checksum'] is not None or spec['read']):
        try:
            with open(path, 'rb') as handle:
                if spec['read']:
                    data = handle.read(READ_LIMIT + 1)
                    if len(data) > READ_LIMIT:
                        raise ValueError('%s is larger than %d bytes: it is not read' % (path, READ_LIMIT))
                    digest = hashlib.sha1(data)
                else:
                    data, digest = None, hashlib.sha1()
                    for block in iter(lambda: handle.read(65536), b''):
                        digest.update(block)
        except OSError:
            differences.append('unreadable')
        else:
            found['checksum'] = digest.hexdigest()
            if data is not None:
                found['content'] = base64.b64encode(data).decode('ascii')
            if spec['checksum'] is not None and found['checksum'] != spec['checksum']:
                differences.append('content')
    found['differences'] = differences
    return found


def check_specs(specs):
    """Errors in the desired states, before anything is read."""
    errors = []
    for spec in specs:
        path = spec['path']
        if not os.path.isabs(path):
            errors.append('%s: the path must be absolute' % path)
        elif path != '/' and path.endswith('/'):
            errors.append('%s: the path must not end with / (it would follow a symlink)' % path)
        if spec['mode'] is not None and not OCTAL_MODE.match(spec['mode']):
            errors.append("%s: mode must be an octal string such as '0644', not %r" % (path, spec['mode']))
        if spec['checksum'] is not None and not SHA1.match(spec['checksum']):
            errors.append('%s: checksum must be a sha1 (40 lowercase hexadecimal digits)' % path)
        if spec['state'] != 'file' and (spec['checksum'] is not None or spec['read']):
            errors.append('%s: only a file has a checksum and can be read' % path)
        if spec['state'] == 'link' and any(spec[key] is not None for key in ('mode', 'owner', 'group')):
            errors.append('%s: a link is compared by its presence only (no mode, owner or group)' % path)
    paths = [spec['path'] for spec in specs]
    errors.extend('%s: given more than once' % path for path in sorted(set(paths)) if paths.count(path) > 1)
    return errors


def main():
    module = AnsibleModule(
        argument_spec=dict(
            paths=dict(type='list', elements='dict', required=True, options=dict(
                path=dict(type='str', required=True),
                state=dict(type='str', choices=['file', 'directory', 'link'], default='file'),
                mode=dict(type='raw'),
                owner=dict(type='str'),
                group=dict(type='str'),
                checksum=dict(type='str'),
                read=dict(type='bool', default=False),
            )),
        ),
        supports_check_mode=True,
    )
    specs = module.params['paths']
    for spec in specs:
        # An unquoted YAML mode (0644) arrives as the int 420: the mode itself, as for the file module.
        if isinstance(spec['mode'], int) and not isinstance(spec['mode'], bool):
            spec['mode'] = '%04o' % spec['mode']
        elif spec['mode'] is not None:
            spec['mode'] = str(spec['mode'])
    errors = check_specs(specs)
    if errors:
        module.fail_json(msg='managed_files: ' + '; '.join(errors))
    found = {}
    for spec in specs:
        try:
            found[spec['path']] = inspect(spec)
        except ValueError as exc:
            module.fail_json(msg='managed_files: %s' % exc)
    module.exit_json(changed=False, paths=found,
                     differ=[spec['path'] for spec in specs if found[spec['path']]['differences']])


if __name__ == '__main__':
    main()
