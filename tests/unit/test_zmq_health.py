# -*- coding: utf-8 -*-
"""Unit tests for library/zmq_health.py.

Real pyzmq REP servers on 127.0.0.1 (ephemeral ports, threads), real CURVE keys made by the
zmq_curve_keypair module, a real ThreadAuthenticator; no mocks of zmq.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import zmq
import zmq.auth

from conftest import LIBRARY_DIR, MODULE_UTILS_DIR, free_tcp_port, load_library_module, run_module

MODULE = 'zmq_health'
OK = {'status': 'ok', 'ready': True, 'initialized': True}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope='session')
def certdir(tmp_path_factory):
    """The agents' certificates dir (server + client pairs), made by the zmq_curve_keypair module."""
    d = tmp_path_factory.mktemp('certificates')
    keypair = load_library_module('zmq_curve_keypair')
    for name in ('server', 'client'):
        res = run_module(keypair, dict(dir=str(d), name=name))
        assert res['changed'] and not res.get('failed'), res
    return str(d)


@pytest.fixture(scope='session')
def rogue_dir(tmp_path_factory):
    """Key pairs nobody authorised: 'rogue' (a client) and 'otherserver' (a wrong server key)."""
    d = tmp_path_factory.mktemp('rogue')
    keypair = load_library_module('zmq_curve_keypair')
    for name in ('rogue', 'otherserver'):
        run_module(keypair, dict(dir=str(d), name=name))
    return str(d)


def server_keys(certdir):
    return zmq.auth.load_certificate(os.path.join(certdir, 'server.key_secret'))


def z85(path, secret=False):
    pub, sec = zmq.auth.load_certificate(path)
    return (sec if secret else pub).decode('ascii')


@pytest.fixture
def curve_server(rep_server, certdir):
    """Factory: a CURVE REP server with the certdir's server keys and a ThreadAuthenticator."""
    def factory(handler, **kw):
        return rep_server(handler, curve_keys=server_keys(certdir), auth_location=certdir, **kw)
    return factory


def health(args, **kw):
    return run_module(load_library_module(MODULE), args, **kw)


def ep(name, url, **kw):
    d = dict(name=name, url=url)
    d.update(kw)
    return d


def only(res):
    assert len(res['endpoints']) == 1, res
    return res['endpoints'][0]


# ------------------------------------------------------------------------------------ states
def test_healthy_over_curve(curve_server, certdir):
    srv = curve_server(lambda msg: OK)
    res = health(dict(certificates_dir=certdir, timeout=5, endpoints=[ep('sdt', srv.url)]))
    assert not res.get('failed'), res
    assert res['changed'] is False
    assert res['healthy_count'] == 1 and res['unhealthy_count'] == 0
    e = only(res)
    assert e['state'] == 'healthy' and e['healthy'] is True
    assert e['reply'] == OK and e['message'] is None and e['attempts'] == 1
    assert isinstance(e['latency_ms'], float) and e['latency_ms'] < 5000
    assert res['attempts'] == 1 and res['elapsed_ms'] > 0
    assert json.loads(srv.received[0]) == {'action': 'health_check'}


def test_check_mode_is_supported(curve_server, certdir):
    srv = curve_server(lambda msg: OK)
    res = health(dict(certificates_dir=certdir, timeout=5, endpoints=[ep('sdt', srv.url)]), check_mode=True)
    assert not res.get('failed') and not res.get('skipped'), res
    assert res['changed'] is False and only(res)['state'] == 'healthy'


def test_degraded_fails_unless_allowed(curve_server, certdir):
    srv = curve_server(lambda msg: {'status': 'degraded', 'message': 'GPU memory low'})
    args = dict(certificates_dir=certdir, timeout=5, endpoints=[ep('tts-agent', srv.url)])
    res = health(args)
    assert res.get('failed') is True
    e = only(res)
    assert e['state'] == 'degraded' and e['healthy'] is False
    assert 'GPU memory low' in e['message']
    assert 'tts-agent (%s): degraded' % srv.url in res['msg']

    res = health(dict(args, allow_degraded=True))
    assert not res.get('failed'), res
    e = only(res)
    assert e['state'] == 'degraded' and e['healthy'] is True
    assert res['healthy_count'] == 1 and res['unhealthy_count'] == 0


def test_wrong_server_key_is_auth_failed_fast(curve_server, certdir, rogue_dir):
    srv = curve_server(lambda msg: OK)
    wrong = z85(os.path.join(rogue_dir, 'otherserver.key'))
    res = health(dict(certificates_dir=certdir, timeout=5, fail_on_unhealthy=False,
                      endpoints=[ep('sdt', srv.url, server_public_key=wrong)]))
    e = only(res)
    assert e['state'] == 'auth_failed', e
    assert 'wrong server public key' in e['message']
    assert e['latency_ms'] < 2500, 'auth failure should be detected before the timeout'
    assert srv.received == []


def test_unauthorised_client_is_auth_failed_fast(curve_server, certdir, rogue_dir):
    srv = curve_server(lambda msg: OK)
    rogue = os.path.join(rogue_dir, 'rogue.key_secret')
    res = health(dict(server_public_key=z85(os.path.join(certdir, 'server.key')),
                      client_public_key=z85(rogue), client_secret_key=z85(rogue, secret=True),
                      timeout=5, endpoints=[ep('sdt', srv.url)]))
    assert res.get('failed') is True
    e = only(res)
    assert e['state'] == 'auth_failed', e
    assert 'not authorised' in e['message'] and 'ZAP status 400' in e['message']
    assert e['latency_ms'] < 2500
    assert srv.received == []


def test_plain_check_of_curve_server_is_auth_failed(curve_server):
    srv = curve_server(lambda msg: OK)
    e = only(health(dict(timeout=5, fail_on_unhealthy=False, endpoints=[ep('sdt', srv.url)])))
    assert e['state'] == 'auth_failed', e
    # libzmq reports either the mechanism mismatch or the server's close first (a race).
    assert 'mechanism mismatch' in e['message'] or 'requires CURVE' in e['message']


def test_dead_port_is_refused_fast():
    url = 'tcp://127.0.0.1:%d' % free_tcp_port()
    timeout = 5.0
    t0 = time.monotonic()
    res = health(dict(timeout=timeout, endpoints=[ep('dead', url)]))
    wall = time.monotonic() - t0
    e = only(res)
    assert e['state'] == 'refused', e
    assert res.get('failed') is True
    assert res['msg'] == '1 of 1 ZMQ endpoints unhealthy: dead (%s): refused' % url
    # Record the detection latency (informational) and check it is far below the timeout.
    print('refused detected after %.1f ms (module wall %.3f s)' % (e['latency_ms'], wall))
    assert e['latency_ms'] < timeout * 1000 / 2
    assert wall < timeout / 2


def test_silent_server_is_timeout(rep_server):
    srv = rep_server(lambda msg: None)
    res = health(dict(timeout=1, endpoints=[ep('responder', srv.url)]))
    e = only(res)
    assert e['state'] == 'timeout', e
    assert 'no reply within 1s' in e['message']
    assert 900 <= e['latency_ms'] < 4000
    assert srv.received  # the request did arrive


def test_non_json_reply_is_bad_reply(rep_server):
    srv = rep_server(lambda msg: b'hello there')
    e = only(health(dict(timeout=5, fail_on_unhealthy=False, endpoints=[ep('x', srv.url)])))
    assert e['state'] == 'bad_reply' and e['healthy'] is False
    assert 'not JSON' in e['message']
    assert e['reply'] == 'hello there'


def test_false_expectation_is_bad_reply(rep_server):
    srv = rep_server(lambda msg: {'status': 'error', 'message': 'model not loaded'})
    e = only(health(dict(timeout=5, fail_on_unhealthy=False, endpoints=[ep('x', srv.url)])))
    assert e['state'] == 'bad_reply'
    assert "status == 'ok'" in e['message'] and 'model not loaded' in e['message']


def test_custom_expect(rep_server):
    srv = rep_server(lambda msg: {'status': 'success', 'ready': True, 'health_status': 'healthy'})
    res = health(dict(timeout=5, expect="status == 'success' && ready", endpoints=[
        ep('module-level', srv.url),
        ep('per-endpoint', srv.url, expect="health_status == 'unhealthy'"),
    ], fail_on_unhealthy=False))
    states = [e['state'] for e in res['endpoints']]
    assert states == ['healthy', 'bad_reply']


def test_string_request_ping_pong(rep_server):
    srv = rep_server(lambda msg: b'pong' if msg == b'ping' else b'?')
    res = health(dict(timeout=5, endpoints=[ep('legacy', srv.url, request='ping', expect="@ == 'pong'")]))
    assert not res.get('failed'), res
    e = only(res)
    assert e['state'] == 'healthy' and e['reply'] == 'pong'
    assert srv.received == [b'ping']


def test_wait_timeout_finds_late_server(rep_server):
    port = free_tcp_port()
    srv = rep_server(lambda msg: OK, port=port, start=False)
    starter = threading.Timer(1.0, srv.start)
    starter.start()
    try:
        res = health(dict(timeout=2, wait_timeout=15, endpoints=[ep('late', srv.url)]))
    finally:
        starter.join()
    assert not res.get('failed'), res
    e = only(res)
    assert e['state'] == 'healthy'
    assert e['attempts'] > 1 and res['attempts'] == e['attempts']
    assert res['elapsed_ms'] < 10000


def test_wait_timeout_gives_up_at_deadline():
    url = 'tcp://127.0.0.1:%d' % free_tcp_port()
    t0 = time.monotonic()
    res = health(dict(timeout=2, wait_timeout=1, endpoints=[ep('dead', url)]))
    wall = time.monotonic() - t0
    assert res.get('failed') is True
    assert only(res)['state'] == 'refused' and res['attempts'] >= 2
    assert 0.9 <= wall < 4


def test_endpoints_are_checked_concurrently(rep_server):
    """Five silent servers with timeout 1 s cost about 1 s, not 5 s."""
    servers = [rep_server(lambda msg: None) for _ in range(5)]
    t0 = time.monotonic()
    res = health(dict(timeout=1, fail_on_unhealthy=False,
                      endpoints=[ep('s%d' % i, s.url) for i, s in enumerate(servers)]))
    wall = time.monotonic() - t0
    assert [e['state'] for e in res['endpoints']] == ['timeout'] * 5
    assert wall < 3.5


def test_mixed_results_order_and_message(curve_server, certdir, rep_server):
    good = curve_server(lambda msg: OK)
    silent = curve_server(lambda msg: None)
    dead = 'tcp://127.0.0.1:%d' % free_tcp_port()
    res = health(dict(certificates_dir=certdir, timeout=1, endpoints=[
        ep('b-good', good.url), ep('a-dead', dead), ep('c-silent', silent.url)]))
    assert res.get('failed') is True
    assert [e['name'] for e in res['endpoints']] == ['b-good', 'a-dead', 'c-silent']
    assert [e['state'] for e in res['endpoints']] == ['healthy', 'refused', 'timeout']
    assert res['healthy_count'] == 1 and res['unhealthy_count'] == 2
    assert res['msg'] == ('2 of 3 ZMQ endpoints unhealthy: a-dead (%s): refused; c-silent (%s): timeout'
                          % (dead, silent.url))


def test_fail_on_unhealthy_false():
    url = 'tcp://127.0.0.1:%d' % free_tcp_port()
    res = health(dict(timeout=5, fail_on_unhealthy=False, endpoints=[ep('dead', url)]))
    assert not res.get('failed')
    assert res['unhealthy_count'] == 1 and res['healthy_count'] == 0
    assert 'dead (%s): refused' % url in res['msg']


# ------------------------------------------------------------------------------------ secrets
def test_secret_never_in_results(curve_server, certdir, rogue_dir):
    srv = curve_server(lambda msg: OK)
    client_secret = z85(os.path.join(certdir, 'client.key_secret'), secret=True)
    server_secret = z85(os.path.join(certdir, 'server.key_secret'), secret=True)
    dead = 'tcp://127.0.0.1:%d' % free_tcp_port()
    wrong = z85(os.path.join(rogue_dir, 'otherserver.key'))
    endpoints = [ep('good', srv.url), ep('dead', dead), ep('wrong-key', srv.url, server_public_key=wrong)]

    from_dir = health(dict(certificates_dir=certdir, timeout=5, endpoints=endpoints))
    from_options = health(dict(
        server_public_key=z85(os.path.join(certdir, 'server.key')),
        client_public_key=z85(os.path.join(certdir, 'client.key')),
        client_secret_key=client_secret, timeout=5, endpoints=endpoints), diff=True)
    for res in (from_dir, from_options):
        assert [e['state'] for e in res['endpoints']] == ['healthy', 'refused', 'auth_failed'], res
        dumped = json.dumps(res)
        assert client_secret not in dumped
        assert server_secret not in dumped

    # also not in validation errors
    bad = health(dict(server_public_key='x' * 40, client_public_key=z85(os.path.join(certdir, 'client.key')),
                      client_secret_key=client_secret, endpoints=[ep('a', srv.url)]))
    assert bad.get('failed') is True and client_secret not in json.dumps(bad)


# ------------------------------------------------------------------------------------ input errors
@pytest.mark.parametrize('args, fragment', [
    (dict(endpoints=[]), 'non-empty'),
    (dict(endpoints=[ep('a', 'tcp://127.0.0.1:1'), ep('a', 'tcp://127.0.0.1:2')]), 'duplicated: a'),
    (dict(endpoints=[ep('bad-url', 'http://127.0.0.1:80')]), "endpoint 'bad-url': url"),
    (dict(endpoints=[ep('no-port', 'tcp://127.0.0.1')]), "endpoint 'no-port': url"),
    (dict(endpoints=[ep('port0', 'tcp://127.0.0.1:0')]), "endpoint 'port0': url 'tcp://127.0.0.1:0' has port 0"),
    (dict(endpoints=[ep('big', 'tcp://h:70000')]), 'outside 1..65535'),
    (dict(expect='status ==', endpoints=[ep('a', 'tcp://127.0.0.1:1')]), 'option expect: invalid JMESPath'),
    (dict(endpoints=[ep('jp', 'tcp://127.0.0.1:1', expect='[?')]), "endpoint 'jp', option expect: invalid JMESPath"),
    (dict(certificates_dir='/nonexistent', client_public_key='a' * 40, client_secret_key='b' * 40,
          endpoints=[ep('a', 'tcp://127.0.0.1:1')]), 'mutually exclusive'),
    (dict(client_public_key='a' * 40, endpoints=[ep('a', 'tcp://127.0.0.1:1')]), 'client_secret_key'),
    (dict(server_public_key='a' * 40, endpoints=[ep('a', 'tcp://127.0.0.1:1')]), 'client_public_key'),
    (dict(endpoints=[ep('k', 'tcp://127.0.0.1:1', server_public_key='a' * 40)]), 'no client keys'),
    (dict(certificates_dir='/nonexistent/certs', endpoints=[ep('a', 'tcp://127.0.0.1:1')]), 'does not exist'),
    (dict(timeout=0, endpoints=[ep('a', 'tcp://127.0.0.1:1')]), 'timeout must be greater than 0'),
])
def test_invalid_input(args, fragment):
    t0 = time.monotonic()
    res = health(args)
    assert res.get('failed') is True, res
    assert fragment in res['msg'], res['msg']
    assert 'endpoints' not in res or not res['endpoints']  # failed before any network I/O
    assert time.monotonic() - t0 < 2


def test_client_keys_without_server_key_names_endpoint(certdir):
    res = health(dict(client_public_key=z85(os.path.join(certdir, 'client.key')),
                      client_secret_key=z85(os.path.join(certdir, 'client.key_secret'), secret=True),
                      endpoints=[ep('has-key', 'tcp://127.0.0.1:1',
                                    server_public_key=z85(os.path.join(certdir, 'server.key'))),
                                 ep('lacks-key', 'tcp://127.0.0.1:2')]))
    assert res.get('failed') is True
    assert 'lacks-key' in res['msg'] and 'has-key' not in res['msg']


def test_certificates_dir_with_other_client_pair(tmp_path, certdir, rep_server):
    """client_key_name picks another pair (e.g. health-probe) from certificates_dir."""
    for f in ('server.key', 'server.key_secret'):
        shutil.copy(os.path.join(certdir, f), str(tmp_path / f))
    res = run_module(load_library_module('zmq_curve_keypair'), dict(dir=str(tmp_path), name='health-probe'))
    assert res['changed']
    srv = rep_server(lambda msg: OK, curve_keys=server_keys(certdir), auth_location=str(tmp_path))
    args = dict(certificates_dir=str(tmp_path), timeout=5, endpoints=[ep('a', srv.url)])
    assert only(health(dict(args, client_key_name='health-probe')))['state'] == 'healthy'
    missing = health(args)  # no client.key_secret in this directory
    assert missing.get('failed') is True and 'client.key_secret is missing' in missing['msg']


def test_certificates_dir_with_mismatched_client_key(tmp_path, certdir):
    for f in os.listdir(certdir):
        shutil.copy(os.path.join(certdir, f), str(tmp_path / f))
    shutil.copy(os.path.join(certdir, 'server.key'), str(tmp_path / 'client.key'))
    res = health(dict(certificates_dir=str(tmp_path), endpoints=[ep('a', 'tcp://127.0.0.1:1')]))
    assert res.get('failed') is True and 'differs' in res['msg']


# ------------------------------------------------------------------------------------ missing libs
@pytest.mark.parametrize('blocked, lib', [('zmq', 'pyzmq'), ('jmespath', 'jmespath')])
def test_missing_library_is_reported(monkeypatch, blocked, lib):
    """With pyzmq or jmespath not importable the module fails with missing_required_lib's message."""
    from conftest import MODULE_UTILS_DIR as mu_dir, load_source
    for name in list(sys.modules):
        if name == blocked or name.startswith(blocked + '.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # makes "import <blocked>" raise ImportError
    monkeypatch.setitem(sys.modules, 'ansible.module_utils.zmq_curve', None)
    load_source('ansible.module_utils.zmq_curve', os.path.join(mu_dir, 'zmq_curve.py'))
    mod = load_source('_library_zmq_health_nolib', os.path.join(LIBRARY_DIR, 'zmq_health.py'))
    res = run_module(mod, dict(endpoints=[ep('a', 'tcp://127.0.0.1:1')]))
    assert res.get('failed') is True
    assert 'Failed to import the required Python library (%s' % lib in res['msg']


# ------------------------------------------------------------------------------------ real Ansible
def test_runs_under_the_ansible_cli(tmp_path, rep_server):
    ansible = os.path.join(os.path.dirname(sys.executable), 'ansible')
    if not os.path.exists(ansible):
        pytest.skip('ansible CLI not found next to %s' % sys.executable)
    srv = rep_server(lambda msg: OK)
    dead = 'tcp://127.0.0.1:%d' % free_tcp_port()
    args = dict(timeout=5, fail_on_unhealthy=False, endpoints=[ep('good', srv.url), ep('dead', dead)])
    env = dict(os.environ,
               ANSIBLE_LIBRARY=LIBRARY_DIR, ANSIBLE_MODULE_UTILS=MODULE_UTILS_DIR,
               ANSIBLE_CONFIG=str(tmp_path / 'none.cfg'), ANSIBLE_LOCAL_TEMP=str(tmp_path / 'tmp'),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / 'rtmp'), ANSIBLE_NOCOLOR='1',
               ANSIBLE_LOCALHOST_WARNING='False', ANSIBLE_INVENTORY_UNPARSED_WARNING='False')
    proc = subprocess.run(
        [ansible, 'localhost', '-i', 'localhost,', '-c', 'local', '-m', MODULE, '-a', json.dumps(args),
         '-e', 'ansible_python_interpreter=%s' % sys.executable],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert 'localhost | SUCCESS =>' in out, out
    result, _end = json.JSONDecoder().raw_decode(out[out.index('{'):])
    assert [e['state'] for e in result['endpoints']] == ['healthy', 'refused']
    assert result['changed'] is False and result['elapsed_ms'] > 0
