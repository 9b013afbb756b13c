# -*- coding: utf-8 -*-
"""Unit tests for library/managed_files.py (real files in tmp_path, no mocks)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

MODULE = 'managed_files'
UID, GID = 10001, 10001  # the agents' ids: no name on this machine


@pytest.fixture
def compare(module_runner):
    def run(paths, **kw):
        return module_runner(MODULE, {'paths': paths}, **kw)
    return run


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / 'daemon.json'
    path.write_bytes(b'{"log-driver": "local"}\n')
    path.chmod(0o644)
    return path


def wanted(path, **overrides):
    spec = {'path': str(path), 'mode': '0644', 'owner': 'root', 'group': 'root',
            'checksum': sha1(path.read_bytes()) if path.is_file() else None}
    spec.update(overrides)
    return {k: v for k, v in spec.items() if v is not None}


def test_a_file_as_wanted_does_not_differ(compare, conf):
    res = compare([wanted(conf)])
    assert res['changed'] is False and not res.get('failed')
    assert res['differ'] == []
    found = res['paths'][str(conf)]
    assert found == {'exists': True, 'type': 'file', 'mode': '0644', 'owner': 'root', 'group': 'root',
                     'checksum': sha1(conf.read_bytes()), 'differences': []}


def test_a_missing_path_differs(compare, tmp_path):
    res = compare([{'path': str(tmp_path / 'absent'), 'mode': '0644'}])
    assert res['differ'] == [str(tmp_path / 'absent')]
    assert res['paths'][str(tmp_path / 'absent')] == {'exists': False, 'differences': ['missing']}


@pytest.mark.parametrize('change, difference', [
    (lambda p: p.chmod(0o600), 'mode'),
    (lambda p: os.chown(p, UID, 0), 'owner'),
    (lambda p: os.chown(p, 0, GID), 'group'),
    (lambda p: p.write_bytes(b'{}\n'), 'content'),
])
def test_each_difference_is_reported_alone(compare, conf, change, difference):
    spec = wanted(conf)
    change(conf)
    res = compare([spec])
    assert res['differ'] == [str(conf)]
    assert res['paths'][str(conf)]['differences'] == [difference]


def test_owner_and_group_may_be_numeric_ids(compare, conf):
    os.chown(conf, UID, GID)
    res = compare([wanted(conf, owner=str(UID), group=str(GID))])
    assert res['differ'] == []
    assert res['paths'][str(conf)]['owner'] == str(UID)  # no name for the uid: the id
    assert compare([wanted(conf, owner='root', group='root')])['paths'][str(conf)]['differences'] == ['owner', 'group']
    os.chown(conf, 0, 0)
    assert compare([wanted(conf, owner='0', group='0')])['differ'] == []


def test_the_type_must_match(compare, tmp_path, conf):
    directory = tmp_path / 'd'
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    res = compare([{'path': str(directory), 'mode': '0755'}, {'path': str(conf), 'state': 'directory', 'mode': '0644'}])
    assert res['paths'][str(directory)]['differences'] == ['type']
    assert res['paths'][str(conf)]['differences'] == ['type']
    assert compare([{'path': str(directory), 'state': 'directory', 'mode': '0755'}])['differ'] == []


def test_a_symlink_is_never_taken_for_its_target(compare, tmp_path, conf):
    link = tmp_path / 'link.json'
    link.symlink_to(conf)
    res = compare([{'path': str(link), 'checksum': sha1(conf.read_bytes())}])
    assert res['differ'] == [str(link)]
    assert res['paths'][str(link)]['type'] == 'link'
    assert 'checksum' not in res['paths'][str(link)]  # the target is not read through the link
    # state=link asks only for the link's presence (systemctl enable's wants/ link).
    assert compare([{'path': str(link), 'state': 'link'}])['differ'] == []
    assert compare([{'path': str(tmp_path / 'no-link'), 'state': 'link'}])['differ'] == [str(tmp_path / 'no-link')]
    assert compare([{'path': str(conf), 'state': 'link'}])['paths'][str(conf)]['differences'] == ['type']


def test_properties_left_out_are_not_compared(compare, conf):
    os.chown(conf, UID, GID)
    conf.write_bytes(b'other\n')
    res = compare([{'path': str(conf), 'mode': '0644'}])
    assert res['differ'] == []
    assert 'checksum' not in res['paths'][str(conf)]


def test_read_returns_the_content_and_its_checksum(compare, conf):
    res = compare([{'path': str(conf), 'read': True}])
    found = res['paths'][str(conf)]
    assert base64.b64decode(found['content']) == conf.read_bytes()
    assert found['checksum'] == sha1(conf.read_bytes())
    assert res['differ'] == []


def test_a_large_file_is_compared_but_never_read(compare, tmp_path):
    big = tmp_path / 'big'
    big.write_bytes(b'x' * (1024 * 1024 + 1))
    assert compare([{'path': str(big), 'checksum': sha1(big.read_bytes())}])['differ'] == []
    res = compare([{'path': str(big), 'read': True}])
    assert res['failed'] is True
    assert 'larger than 1048576 bytes' in res['msg'] and str(big) in res['msg']


@pytest.mark.parametrize('spec, message', [
    ({'path': 'relative/daemon.json'}, 'the path must be absolute'),
    ({'path': '/etc/x', 'mode': 'u=rw'}, "mode must be an octal string such as '0644'"),
    ({'path': '/etc/x', 'mode': '0999'}, "mode must be an octal string"),
    ({'path': '/etc/x', 'checksum': 'abc'}, 'checksum must be a sha1'),
    ({'path': '/etc', 'state': 'directory', 'read': True}, 'only a file has a checksum and can be read'),
    ({'path': '/etc/x', 'state': 'link', 'mode': '0644'}, 'a link is compared by its presence only'),
])
def test_bad_input_fails_before_anything_is_read(compare, spec, message):
    res = compare([spec])
    assert res['failed'] is True
    assert message in res['msg']
    assert 'paths' not in res


def test_an_unknown_state_or_a_path_given_twice_is_refused(compare, conf):
    res = compare([{'path': str(conf), 'state': 'socket'}])
    assert res['failed'] is True and 'socket' in res['msg']
    res = compare([{'path': str(conf)}, {'path': str(conf), 'mode': '0600'}])
    assert res['failed'] is True and 'given more than once' in res['msg']


@pytest.mark.parametrize('check_mode', [False, True])
def test_it_never_changes_the_file_system(compare, conf, tmp_path, check_mode):
    conf.chmod(0o600)
    before = os.stat(conf)
    res = compare([wanted(conf, mode='0644', checksum=sha1(b'other')), {'path': str(tmp_path / 'absent'), 'state': 'directory'}],
                  check_mode=check_mode)
    assert res['changed'] is False
    assert res['differ'] == [str(conf), str(tmp_path / 'absent')]
    assert res['paths'][str(conf)]['differences'] == ['mode', 'content']
    after = os.stat(conf)
    assert (after.st_mode, after.st_mtime_ns, after.st_uid) == (before.st_mode, before.st_mtime_ns, before.st_uid)
    assert not (tmp_path / 'absent').exists()
