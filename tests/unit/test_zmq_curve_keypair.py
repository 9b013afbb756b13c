# -*- coding: utf-8 -*-
"""Unit tests for library/zmq_curve_keypair.py (real files, real pyzmq, no mocks)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import threading

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

MODULE = 'zmq_curve_keypair'


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def secret_of(path):
    return zmq.auth.load_certificate(path)[1].decode('ascii')


@pytest.fixture
def keypair(module_runner):
    def run(args, **kw):
        return module_runner(MODULE, args, **kw)
    return run


def test_create_pair(tmp_path, keypair):
    res = keypair(dict(dir=str(tmp_path), name='server'))
    assert res['changed'] is True and not res.get('failed')
    assert res['generated'] is True and res['dir_created'] is False
    pub_file, sec_file = tmp_path / 'server.key', tmp_path / 'server.key_secret'
    assert res['public_key_file'] == str(pub_file)
    assert res['secret_key_file'] == str(sec_file)
    assert mode_of(sec_file) == 0o600
    assert mode_of(pub_file) == 0o644
    public, secret = zmq.auth.load_certificate(str(sec_file))
    assert zmq.auth.load_certificate(str(pub_file)) == (public, None)
    assert res['public_key'] == public.decode('ascii')
    assert len(res['public_key']) == 40
    # No secret anywhere in the result, and no temporary files left behind.
    assert secret.decode('ascii') not in json.dumps(res)
    assert sorted(os.listdir(tmp_path)) == ['server.key', 'server.key_secret']
    # Exactly pyzmq's certificate format.
    assert 'secret-key' not in pub_file.read_text()
    assert 'ZeroMQ CURVE **Secret** Certificate' in sec_file.read_text()


def test_second_run_is_idempotent(tmp_path, keypair):
    first = keypair(dict(dir=str(tmp_path), name='client'))
    before = (tmp_path / 'client.key_secret').read_bytes()
    second = keypair(dict(dir=str(tmp_path), name='client'))
    assert second['changed'] is False
    assert second['generated'] is False
    assert second['public_key'] == first['public_key']
    assert (tmp_path / 'client.key_secret').read_bytes() == before


def test_check_mode_writes_nothing(tmp_path, keypair):
    res = keypair(dict(dir=str(tmp_path), name='server'), check_mode=True, diff=True)
    assert res['changed'] is True and res['generated'] is True
    assert res['public_key'] is None
    assert os.listdir(tmp_path) == []
    assert res['diff']['before']['public_key_file_present'] is False
    assert res['diff']['after']['secret_key_file_present'] is True

    missing = tmp_path / 'not-yet'
    res = keypair(dict(dir=str(missing), name='server'), check_mode=True)
    assert res['changed'] is True and res['dir_created'] is True
    assert not missing.exists()


def test_creates_missing_dir_0700(tmp_path, keypair):
    target = tmp_path / 'certs' / 'nested'
    res = keypair(dict(dir=str(target), name='server'))
    assert res['changed'] is True and res['dir_created'] is True
    assert mode_of(target) == 0o700
    assert (target / 'server.key_secret').is_file()


def test_force_rotates(tmp_path, keypair):
    first = keypair(dict(dir=str(tmp_path), name='server'))
    old_secret = secret_of(str(tmp_path / 'server.key_secret'))
    res = keypair(dict(dir=str(tmp_path), name='server', force=True), diff=True)
    assert res['changed'] is True and res['generated'] is True
    assert res['public_key'] != first['public_key']
    assert zmq.auth.load_certificate(str(tmp_path / 'server.key'))[0].decode() == res['public_key']
    new_secret = secret_of(str(tmp_path / 'server.key_secret'))
    assert new_secret != old_secret
    assert res['diff']['before']['public_key'] == first['public_key']
    assert res['diff']['after']['public_key'] == res['public_key']
    dumped = json.dumps(res)
    assert old_secret not in dumped and new_secret not in dumped
    assert mode_of(tmp_path / 'server.key_secret') == 0o600


def test_corrupt_pair_is_an_error_unless_force(tmp_path, keypair):
    keypair(dict(dir=str(tmp_path), name='server'))
    (tmp_path / 'server.key_secret').write_text('metadata\ncurve\n    public-key = "garbage"\n')
    res = keypair(dict(dir=str(tmp_path), name='server'))
    assert res.get('failed') is True
    assert 'invalid CURVE key pair server' in res['msg'] and 'force' in res['msg']
    # force repairs it
    res = keypair(dict(dir=str(tmp_path), name='server', force=True))
    assert res['changed'] is True and not res.get('failed')
    zmq.auth.load_certificate(str(tmp_path / 'server.key_secret'))


def test_unparsable_file_is_an_error(tmp_path, keypair):
    keypair(dict(dir=str(tmp_path), name='server'))
    (tmp_path / 'server.key').write_text('this is not a certificate\n')
    res = keypair(dict(dir=str(tmp_path), name='server'))
    assert res.get('failed') is True
    assert 'not a ZeroMQ certificate' in res['msg']


def test_half_present_pair_is_an_error(tmp_path, keypair):
    keypair(dict(dir=str(tmp_path), name='client'))
    secret = secret_of(str(tmp_path / 'client.key_secret'))
    (tmp_path / 'client.key').unlink()
    res = keypair(dict(dir=str(tmp_path), name='client'))
    assert res.get('failed') is True
    assert 'half-present' in res['msg'] and 'client.key is missing' in res['msg']
    assert secret not in json.dumps(res)
    # the other half is still there: nothing was touched
    assert (tmp_path / 'client.key_secret').exists()


def test_mismatched_public_key_is_an_error(tmp_path, keypair):
    keypair(dict(dir=str(tmp_path), name='client'))
    other = tmp_path / 'other'
    other.mkdir()
    zmq.auth.create_certificates(str(other), 'client')
    os.replace(str(other / 'client.key'), str(tmp_path / 'client.key'))
    secret = secret_of(str(tmp_path / 'client.key_secret'))
    res = keypair(dict(dir=str(tmp_path), name='client'))
    assert res.get('failed') is True
    assert 'differs' in res['msg']
    assert secret not in json.dumps(res)


def test_wrong_mode_is_fixed_without_regenerating(tmp_path, keypair):
    first = keypair(dict(dir=str(tmp_path), name='server'))
    sec = tmp_path / 'server.key_secret'
    content = sec.read_bytes()
    os.chmod(str(sec), 0o644)
    os.chmod(str(tmp_path / 'server.key'), 0o600)

    predicted = keypair(dict(dir=str(tmp_path), name='server'), check_mode=True)
    assert predicted['changed'] is True and predicted['generated'] is False
    assert mode_of(sec) == 0o644  # check mode did not fix it

    res = keypair(dict(dir=str(tmp_path), name='server'))
    assert res['changed'] is True and res['generated'] is False
    assert res['public_key'] == first['public_key']
    assert sec.read_bytes() == content
    assert mode_of(sec) == 0o600
    assert mode_of(tmp_path / 'server.key') == 0o644
    assert keypair(dict(dir=str(tmp_path), name='server'))['changed'] is False


def test_custom_mode_and_owner(tmp_path, keypair):
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    args = dict(dir=str(tmp_path), name='server', mode='0640', owner=user, group=group)
    res = keypair(args)
    assert res['changed'] is True
    assert mode_of(tmp_path / 'server.key_secret') == 0o640
    assert os.stat(str(tmp_path / 'server.key_secret')).st_uid == os.getuid()
    assert keypair(args)['changed'] is False


def test_absent(tmp_path, keypair):
    keypair(dict(dir=str(tmp_path), name='server'))
    keypair(dict(dir=str(tmp_path), name='client'))
    predicted = keypair(dict(dir=str(tmp_path), name='server', state='absent'), check_mode=True)
    assert predicted['changed'] is True
    assert (tmp_path / 'server.key').exists()
    res = keypair(dict(dir=str(tmp_path), name='server', state='absent'), diff=True)
    assert res['changed'] is True
    assert sorted(os.listdir(tmp_path)) == ['client.key', 'client.key_secret']
    assert res['diff']['after'] == dict(public_key_file_present=False, secret_key_file_present=False,
                                        public_key=None)
    assert keypair(dict(dir=str(tmp_path), name='server', state='absent'))['changed'] is False


@pytest.mark.parametrize('name', ['', 'a/b', '..'])
def test_invalid_name(tmp_path, keypair, name):
    res = keypair(dict(dir=str(tmp_path), name=name))
    assert res.get('failed') is True
    assert 'name' in res['msg']
    assert os.listdir(tmp_path) == []


def test_dir_is_a_file(tmp_path, keypair):
    f = tmp_path / 'file'
    f.write_text('x')
    res = keypair(dict(dir=str(f), name='server'))
    assert res.get('failed') is True and 'not a directory' in res['msg']


def test_keys_work_for_a_real_curve_exchange(tmp_path, keypair):
    """Keys made by the module: ThreadAuthenticator(location=dir) authorises client.key."""
    keypair(dict(dir=str(tmp_path), name='server'))
    keypair(dict(dir=str(tmp_path), name='client'))
    spub, ssec = zmq.auth.load_certificate(str(tmp_path / 'server.key_secret'))
    cpub, csec = zmq.auth.load_certificate(str(tmp_path / 'client.key_secret'))
    server_key = zmq.auth.load_certificate(str(tmp_path / 'server.key'))[0]

    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve(domain='*', location=str(tmp_path))
        rep = ctx.socket(zmq.REP)
        rep.linger = 0
        rep.curve_secretkey, rep.curve_publickey, rep.curve_server = ssec, spub, True
        port = rep.bind_to_random_port('tcp://127.0.0.1')

        def serve():
            if rep.poll(10000):
                rep.send(b'pong:' + rep.recv())
            rep.close(0)

        t = threading.Thread(target=serve)
        t.start()
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.curve_secretkey, req.curve_publickey, req.curve_serverkey = csec, cpub, server_key
        req.connect('tcp://127.0.0.1:%d' % port)
        req.send(b'ping')
        assert req.poll(10000), 'no reply over CURVE'
        assert req.recv() == b'pong:ping'
        req.close(0)
        t.join(10)
    finally:
        auth.stop()
        ctx.term()
