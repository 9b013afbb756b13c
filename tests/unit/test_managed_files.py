# -*- coding: utf-8 -*-
"""Unit tests for library/managed_files.py (real files in tmp_path, no mocks)."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import multiprocessing
import os
import queue

import pytest
import yaml

from conftest import load_library_module, run_module

MODULE = 'managed_files'
MIB = 1024 * 1024
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


def in_child(target, *args, timeout=30):
    """TARGET(*ARGS) in a forked process; its return value, or AssertionError if it raised or hung."""
    ctx = multiprocessing.get_context('fork')
    results = ctx.Queue()

    def run():
        try:
            results.put(('ok', target(*args)))
        except BaseException as e:  # report, never hang the parent
            results.put(('error', repr(e)))

    proc = ctx.Process(target=run)
    proc.start()
    try:
        kind, value = results.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError('still running after %s seconds' % timeout)
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if kind != 'ok':
        raise AssertionError('the child failed: %s' % value)
    return value


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
    # A wrong id differs like a wrong name.
    assert compare([wanted(conf, owner=str(UID), group=str(GID))])['paths'][str(conf)]['differences'] == ['owner', 'group']


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


def test_check_mode_gives_the_same_result(compare, conf, tmp_path):
    conf.chmod(0o600)
    paths = [wanted(conf), {'path': str(tmp_path / 'absent'), 'state': 'directory'}, {'path': str(tmp_path), 'state': 'directory'}]
    before = os.stat(conf)
    assert compare(paths, check_mode=True) == compare(paths)
    after = os.stat(conf)
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


# --------------------------------------------------------------------------- more of each comparison

@pytest.mark.parametrize('actual, spec_mode, differs', [
    (0o644, '644', False),    # three digits are octal too
    (0o644, '00644', False),
    (0o1777, '1777', False),  # special bits are part of the mode...
    (0o1777, '0777', True),   # ...so they must be asked for
    (0o4755, '0755', True),
    (0o600, '0640', True),
])
def test_mode_is_compared_as_octal_with_special_bits(compare, tmp_path, actual, spec_mode, differs):
    directory = tmp_path / 'd'
    directory.mkdir()
    directory.chmod(actual)
    res = compare([{'path': str(directory), 'state': 'directory', 'mode': spec_mode}])
    assert res['paths'][str(directory)]['mode'] == '%04o' % actual
    assert res['paths'][str(directory)]['differences'] == (['mode'] if differs else [])
    assert res['differ'] == ([str(directory)] if differs else [])


def test_an_unknown_owner_or_group_name_differs(compare, conf):
    res = compare([{'path': str(conf), 'owner': 'no-such-user-mf', 'group': 'no-such-group-mf'}])
    assert not res.get('failed')
    assert res['paths'][str(conf)]['differences'] == ['owner', 'group']


def test_a_symlink_to_a_correct_file_differs_only_by_type(compare, tmp_path, conf):
    link = tmp_path / 'link.json'
    link.symlink_to(conf)
    res = compare([dict(wanted(conf, mode=None), path=str(link))])  # owner, group and checksum of the target
    assert res['differ'] == [str(link)]
    assert res['paths'][str(link)]['differences'] == ['type']
    # A broken link exists too, and is a link.
    broken = tmp_path / 'broken'
    broken.symlink_to(tmp_path / 'nowhere')
    found = compare([{'path': str(broken)}])['paths'][str(broken)]
    assert found['exists'] is True and found['type'] == 'link' and found['differences'] == ['type']
    assert compare([{'path': str(broken), 'state': 'link'}])['differ'] == []


def test_a_fifo_is_other_and_never_opened(tmp_path):
    """Opening a FIFO for reading blocks: the module must not even try (run in a child, with a timeout)."""
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    res = in_child(run_module, load_library_module(MODULE), {'paths': [{'path': str(fifo), 'checksum': sha1(b'')}]})
    found = res['paths'][str(fifo)]
    assert found['type'] == 'other' and found['differences'] == ['type']
    assert 'checksum' not in found
    assert res['differ'] == [str(fifo)]


def test_differ_keeps_the_order_of_the_paths(compare, tmp_path, conf):
    names = ['c', 'a', 'b']
    res = compare([{'path': str(tmp_path / n)} for n in names] + [{'path': str(conf)}])
    assert res['differ'] == [str(tmp_path / n) for n in names]
    assert sorted(res['paths']) == sorted([str(tmp_path / n) for n in names] + [str(conf)])


def test_no_paths_is_no_difference(compare):
    res = compare([])
    assert res['changed'] is False and res['differ'] == [] and res['paths'] == {}


# --------------------------------------------------------------------------- reading

@pytest.mark.parametrize('data', [b'', b'\x00\xff\xfe binary\r\n', b'y' * MIB], ids=['empty', 'binary', 'exactly-1MiB'])
def test_read_returns_any_content_up_to_1mib(compare, tmp_path, data):
    path = tmp_path / 'f'
    path.write_bytes(data)
    found = compare([{'path': str(path), 'read': True}])['paths'][str(path)]
    assert base64.b64decode(found['content'], validate=True) == data
    assert found['checksum'] == sha1(data) and found['differences'] == []
    assert found['exists'] is True and found['type'] == 'file'  # an empty file exists too


def test_read_with_a_checksum_reports_the_content_difference(compare, conf):
    res = compare([{'path': str(conf), 'read': True, 'checksum': sha1(b'wanted\n')}])
    found = res['paths'][str(conf)]
    assert found['differences'] == ['content'] and res['differ'] == [str(conf)]
    assert base64.b64decode(found['content']) == conf.read_bytes()
    assert found['checksum'] == sha1(conf.read_bytes())
    # With the right checksum: the same content, no difference.
    assert compare([{'path': str(conf), 'read': True, 'checksum': sha1(conf.read_bytes())}])['differ'] == []


def test_checksum_only_never_returns_the_content(compare, tmp_path, conf):
    big = tmp_path / 'big'
    big.write_bytes(os.urandom(3 * MIB))
    res = compare([{'path': str(conf), 'checksum': sha1(conf.read_bytes())}, {'path': str(big), 'checksum': sha1(b'no')}])
    assert 'content' not in res['paths'][str(conf)] and 'content' not in res['paths'][str(big)]
    assert res['paths'][str(big)]['checksum'] == sha1(big.read_bytes())
    assert res['differ'] == [str(big)]


def test_read_is_not_tried_on_what_is_not_a_file(compare, tmp_path):
    directory = tmp_path / 'd'
    directory.mkdir()
    found = compare([{'path': str(directory), 'read': True}])['paths'][str(directory)]
    assert found['differences'] == ['type'] and 'content' not in found and 'checksum' not in found


# --------------------------------------------------------------------------- unreadable paths
# Root reads everything, so a forked child gives up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
# (uid 0 stays): files and directories owned by another uid with no permission for others are
# then really unreadable to it.

def _without_dac_override(probe, paths):
    """In the child: drop the DAC capabilities, check PROBE is unreadable, run the module on PATHS."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32), ('inheritable', ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        return 'capget failed: errno %d' % ctypes.get_errno()
    keep = ~((1 << 1) | (1 << 2)) & 0xffffffff  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    for field in ('effective', 'permitted', 'inheritable'):
        setattr(data[0], field, getattr(data[0], field) & keep)
    if libc.capset(ctypes.byref(header), data) != 0:
        return 'capset failed: errno %d' % ctypes.get_errno()
    try:
        open(probe, 'rb').close()
    except PermissionError:
        return run_module(load_library_module(MODULE), {'paths': paths})
    return 'still readable without CAP_DAC_OVERRIDE'


def test_an_unreadable_file_or_directory_differs(tmp_path):
    secret = tmp_path / 'secret'
    secret.write_bytes(b'key\n')
    os.chown(secret, UID, GID)
    secret.chmod(0)
    closed = tmp_path / 'closed'
    closed.mkdir()
    (closed / 'inside').write_bytes(b'x')
    os.chown(closed, UID, GID)
    closed.chmod(0o700)
    meta_only = tmp_path / 'meta-only'
    meta_only.write_bytes(b'')
    os.chown(meta_only, UID, GID)
    meta_only.chmod(0)
    paths = [{'path': str(secret), 'checksum': sha1(b'key\n')},
             {'path': str(closed / 'inside')},
             # lstat needs no permission on the file itself: without checksum or read it is as wanted
             {'path': str(meta_only), 'mode': '0000', 'owner': str(UID)}]
    res = in_child(_without_dac_override, str(secret), paths)
    if isinstance(res, str):
        pytest.skip('cannot make a file unreadable to root here: %s' % res)
    found = res['paths'][str(secret)]
    assert found['exists'] is True and found['type'] == 'file' and found['mode'] == '0000'
    assert found['differences'] == ['unreadable'] and 'checksum' not in found
    assert res['paths'][str(closed / 'inside')] == {'exists': False, 'differences': ['unreadable']}
    assert res['paths'][str(meta_only)]['differences'] == []
    assert res['differ'] == [str(secret), str(closed / 'inside')]
    # read: true on it is no failure either, and returns no content.
    res = in_child(_without_dac_override, str(secret), [{'path': str(secret), 'read': True}])
    assert res['paths'][str(secret)]['differences'] == ['unreadable'] and 'content' not in res['paths'][str(secret)]


def test_a_path_under_a_file_is_unreadable_not_an_error(compare, conf):
    res = compare([{'path': str(conf / 'child')}])  # lstat: ENOTDIR, even for root
    assert res['paths'][str(conf / 'child')] == {'exists': False, 'differences': ['unreadable']}
    assert res['differ'] == [str(conf / 'child')]


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('spec, message', [
    ({'path': '/etc/x', 'mode': '644x'}, 'mode must be an octal string'),
    ({'path': '/etc/x', 'mode': ''}, 'mode must be an octal string'),
    ({'path': '/etc/x', 'checksum': 'A' * 40}, 'checksum must be a sha1'),  # lowercase only, as hash('sha1') gives
    ({'path': '/etc/x', 'checksum': 'a' * 41}, 'checksum must be a sha1'),
    ({'path': '/etc/x', 'checksum': 'g' * 40}, 'checksum must be a sha1'),
    ({'path': '/etc', 'state': 'directory', 'checksum': 'a' * 40}, 'only a file has a checksum and can be read'),
    ({'path': '/etc/x', 'state': 'link', 'read': True}, 'only a file has a checksum and can be read'),
    ({'path': '/etc/x', 'state': 'link', 'owner': 'root'}, 'a link is compared by its presence only'),
])
def test_more_bad_input(compare, spec, message):
    res = compare([spec])
    assert res['failed'] is True and message in res['msg'] and 'paths' not in res


def test_bad_input_is_refused_before_any_path_is_read(compare, tmp_path):
    """Every error at once, and none from reading: the large file given first is never read."""
    big = tmp_path / 'big'
    big.write_bytes(b'x' * (MIB + 1))
    res = compare([{'path': str(big), 'read': True}, {'path': 'rel'}, {'path': '/etc/x', 'mode': 'u=rw'}, {'path': 'rel'}])
    assert res['failed'] is True and 'paths' not in res
    assert 'larger than' not in res['msg']
    assert res['msg'].startswith('managed_files: ')
    for part in ('rel: the path must be absolute', "/etc/x: mode must be an octal string such as '0644', not 'u=rw'",
                 'rel: given more than once'):
        assert part in res['msg']


def test_unknown_suboptions_are_refused(compare, conf):
    res = compare([{'path': str(conf), 'content': 'x'}])
    assert res['failed'] is True and 'content' in res['msg']
    res = compare([{'mode': '0644'}])
    assert res['failed'] is True and 'path' in res['msg']


# --------------------------------------------------------------------------- documentation
# test_module_docs.py already runs `ansible-doc` for every module in library/; here: what the
# documentation promises is what the module takes and returns.

def test_the_documentation_matches_the_module(compare, conf):
    module = load_library_module(MODULE)
    doc = yaml.safe_load(module.DOCUMENTATION)
    returns = yaml.safe_load(module.RETURN)
    yaml.safe_load(module.EXAMPLES)
    res = compare([{'path': str(conf), 'read': True, 'checksum': sha1(conf.read_bytes()), 'mode': '0644',
                    'owner': 'root', 'group': 'root'}])
    assert set(res) - {'changed', 'invocation'} == set(returns) == {'differ', 'paths'}
    assert set(res['paths'][str(conf)]) == set(returns['paths']['contains'])
    assert set(res['invocation']['module_args']['paths'][0]) == set(doc['options']['paths']['suboptions'])
    assert doc['options']['paths']['suboptions']['state']['choices'] == ['file', 'directory', 'link']


# --------------------------------------------------------------------------- paths and modes as roles write them

def test_a_trailing_slash_does_not_hide_a_symlink(compare, tmp_path):
    """A symlink where a directory is wanted must differ; lstat('link/') follows the link."""
    real = tmp_path / 'real'
    real.mkdir()
    link = tmp_path / 'link'
    link.symlink_to(real)
    res = compare([{'path': str(link) + '/', 'state': 'directory'}])
    assert res.get('failed') or res['differ'] == [str(link) + '/']


@pytest.mark.parametrize('given', ['~/daemon.json', '$MF_TEST_DIR/daemon.json'])
def test_a_path_is_reported_as_it_was_given(compare, conf, tmp_path, monkeypatch, given):
    """Roles look paths up in `differ` and `paths` as they gave them (`item.path in files.differ`)."""
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('MF_TEST_DIR', str(tmp_path))
    conf.chmod(0o600)
    res = compare([{'path': given, 'mode': '0644'}])
    # Refusing such a path would do as well as keeping it.
    assert res.get('failed') or (res['differ'] == [given] and given in res['paths'])


def test_an_integer_mode_is_not_misread(compare, conf):
    """`mode: 0644` unquoted in YAML is the int 420; AnsibleModule makes it the string '420'."""
    res = compare([{'path': str(conf), 'mode': 0o644}])
    # Either refused, or read as ansible.builtin.file reads it (the int is the mode).
    assert res.get('failed') or res['differ'] == []
