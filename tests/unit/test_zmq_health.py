# -*- coding: utf-8 -*-
"""Unit tests for library/zmq_health.py.

Real pyzmq REP servers on 127.0.0.1 (ephemeral ports, threads), real CURVE keys made by the
zmq_curve_keypair module, a real ThreadAuthenticator; no mocks of zmq.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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
    (dict(timeout=0, endpoints=[ep('a', 'tcp://127.0.0.1:1')]), 'timeout must be a finite number'),
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


# ==================================================================================== issue 12
# zmq_health at thousands of endpoints and against hostile replies.

class Farm(object):
    """COUNT REP sockets on 127.0.0.1, served by one thread with one context.

    ``replies(index, request_bytes)`` gives the reply of socket INDEX: bytes or str (one frame), a
    list of bytes (several frames), a dict or list (sent as JSON), or None (never answer).
    ``curve_keys`` = (public, secret) of the server; ``auth_location`` adds a ThreadAuthenticator.
    """

    def __init__(self, count, replies, curve_keys=None, auth_location=None):
        self.count = count
        self.replies = replies
        self.curve_keys = curve_keys
        self.auth_location = auth_location
        self.ports = []
        self.requests = 0
        self.errors = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.ctx = zmq.Context()
        self.auth = None
        self.thread = threading.Thread(target=self._serve, name='rep-farm', daemon=True)

    @property
    def urls(self):
        return ['tcp://127.0.0.1:%d' % p for p in self.ports]

    def start(self):
        if self.auth_location is not None:
            from zmq.auth.thread import ThreadAuthenticator
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain='*', location=self.auth_location)
        self.thread.start()
        if not self._ready.wait(30) or self.errors:
            raise RuntimeError('REP farm failed to start: %r' % self.errors)
        return self

    def _serve(self):
        socks = {}
        poller = zmq.Poller()
        try:
            self.ctx.set(zmq.MAX_SOCKETS, 3 * self.count + 64)
            for index in range(self.count):
                s = self.ctx.socket(zmq.REP)
                s.linger = 0
                s.sndhwm = 0
                if self.curve_keys:
                    s.curve_publickey, s.curve_secretkey = self.curve_keys
                    s.curve_server = True
                self.ports.append(s.bind_to_random_port('tcp://127.0.0.1'))
                socks[s] = index
                poller.register(s, zmq.POLLIN)
        except Exception as e:  # pragma: no cover - shows up in start()
            self.errors.append(e)
        self._ready.set()
        try:
            while not self._stop.is_set():
                for s, _ev in poller.poll(50):
                    request = s.recv()
                    self.requests += 1
                    try:
                        reply = self.replies(socks[s], request)
                    except Exception as e:  # pragma: no cover - a bug in the test
                        self.errors.append(e)
                        reply = b'farm handler error'
                    if reply is None:
                        poller.unregister(s)  # silent from now on
                        continue
                    if isinstance(reply, str):
                        reply = reply.encode('utf-8')
                    elif isinstance(reply, (dict, tuple)) or (isinstance(reply, list) and not all(
                            isinstance(f, bytes) for f in reply)) or reply == []:
                        reply = json.dumps(reply).encode('utf-8')
                    if isinstance(reply, list):
                        s.send_multipart(reply)
                    else:
                        s.send(reply)
        finally:
            for s in socks:
                s.close(0)

    def stop(self):
        self._stop.set()
        self.thread.join(10)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


@pytest.fixture
def farm():
    """Factory: ``farm(count, replies, curve_keys=None, auth_location=None)`` -> started Farm."""
    farms = []

    def factory(count, replies, **kw):
        f = Farm(count, replies, **kw)
        farms.append(f)
        return f.start()

    yield factory
    for f in farms:
        f.stop()


# The module in a child process with RLIMIT_NOFILE set to (SOFT, HARD) before anything is imported
# (the test process keeps its own limit and serves the endpoints). Prints the result and the wall
# time of the module call.
LIMITED_RUNNER = r'''
import json, os, sys, time
soft, hard, unit_dir = sys.argv[1], sys.argv[2], sys.argv[3]
if soft != '-':
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(soft), int(hard)))
sys.path.insert(0, unit_dir)
from conftest import load_library_module, run_module
args = json.load(sys.stdin)
t0 = time.monotonic()
res = run_module(load_library_module('zmq_health'), args)
res['_wall_s'] = time.monotonic() - t0
import resource
res['_maxrss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
sys.stdout.write('\nRESULT ' + json.dumps(res, allow_nan=False) + '\n')
'''


def run_in_child(args, soft='-', hard='-', timeout=60):
    """Run zmq_health in a child process (optionally with RLIMIT_NOFILE (SOFT, HARD)); return its result."""
    proc = subprocess.run(
        [sys.executable, '-c', LIMITED_RUNNER, str(soft), str(hard), os.path.dirname(os.path.abspath(__file__))],
        input=json.dumps(args), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')][-1]
    return json.loads(line[len('RESULT '):])


def states_of(res):
    counts = {}
    for e in res['endpoints']:
        counts[e['state']] = counts.get(e['state'], 0) + 1
    return counts


def strict_json(value):
    """json.dumps that refuses NaN and Infinity (standard JSON only)."""
    return json.dumps(value, allow_nan=False)


# ------------------------------------------------------------------------------------ many endpoints
def test_more_endpoints_than_libzmqs_default_socket_limit(farm):
    """400 endpoints need 1200 sockets, more than the 1023 a context allows by default.

    Issue 12: ctx.setsockopt(MAX_SOCKETS) only set a default socket option, so above 341 endpoints
    the rest were reported 'refused' ("Too many open files").
    """
    f = farm(400, lambda i, req: OK)
    res = health(dict(timeout=20, endpoints=[ep('e%03d' % i, u) for i, u in enumerate(f.urls)]))
    assert states_of(res) == {'healthy': 400}, [e for e in res['endpoints'] if e['state'] != 'healthy'][:3]
    assert not res.get('failed') and res['concurrency'] == 400


@pytest.mark.parametrize('soft, hard, curve', [(256, 256, True), (128, 4096, False)],
                         ids=['batched-under-256-curve', 'soft-raised-to-hard'])
def test_descriptor_limit_batches_instead_of_refusing(farm, certdir, soft, hard, curve):
    """150 endpoints need about 600 descriptors.

    Issue 12: with too few descriptors the module reported 'refused' or hung in disable_monitor().
    Under a hard limit of 256 the module checks the endpoints in batches; with a soft limit of 128
    and a hard limit of 4096 it raises the soft limit and checks all at once.
    """
    kw = dict(curve_keys=server_keys(certdir), auth_location=certdir) if curve else {}
    f = farm(150, lambda i, req: OK, **kw)
    args = dict(timeout=20, endpoints=[ep('e%03d' % i, u) for i, u in enumerate(f.urls)])
    if curve:
        args['certificates_dir'] = certdir
    res = run_in_child(args, soft, hard, timeout=60)
    assert states_of(res) == {'healthy': 150}, [e for e in res['endpoints'] if e['state'] != 'healthy'][:3]
    if soft == hard:
        assert 1 <= res['concurrency'] < 150
    else:
        assert res['concurrency'] == 150


# ------------------------------------------------------------------------------------ the deadline
class TcpPeers(object):
    """Plain TCP listeners on 127.0.0.1 that misbehave for a ZeroMQ client.

    ``mute``: the kernel completes the TCP handshake (listen backlog), nobody ever reads or writes.
    ``trickle``: accepts and sends one byte of a never-ending greeting every 200 ms.
    """

    def __init__(self, mute=0, trickle=0):
        self.listeners = []
        self.mute_ports = []
        self.trickle_ports = []
        for _ in range(mute):
            s = self._listen()
            self.mute_ports.append(s.getsockname()[1])
        self._trickle = []
        for _ in range(trickle):
            s = self._listen()
            s.setblocking(False)
            self._trickle.append(s)
            self.trickle_ports.append(s.getsockname()[1])
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _listen(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(('127.0.0.1', 0))
        s.listen(256)
        self.listeners.append(s)
        return s

    def _serve(self):
        conns = []
        while not self._stop.wait(0.2):
            for s in self._trickle:
                try:
                    while True:
                        conn, _addr = s.accept()
                        conns.append(conn)
                except (BlockingIOError, OSError):
                    pass
            for conn in list(conns):
                try:
                    conn.send(b'\xff')
                except OSError:
                    conns.remove(conn)
        for conn in conns:
            conn.close()

    def close(self):
        self._stop.set()
        self.thread.join(5)
        for s in self.listeners:
            s.close()


def test_hard_deadline_whatever_the_peers_do(farm):
    """No call runs longer than wait_timeout + timeout plus a small constant.

    Peers that never answer, never speak ZMTP, trickle bytes, or refuse, and more endpoints than a
    hard RLIMIT_NOFILE of 160 lets the module check at once (so some cannot even be started).
    Endpoints that were never checked are 'timeout' with attempts 0, never 'refused'.
    """
    silent = farm(40, lambda i, req: None)
    peers = TcpPeers(mute=40, trickle=10)
    try:
        dead = ['tcp://127.0.0.1:%d' % free_tcp_port() for _ in range(20)]
        endpoints = ([ep('silent%02d' % i, u) for i, u in enumerate(silent.urls)]
                     + [ep('mute%02d' % i, 'tcp://127.0.0.1:%d' % p) for i, p in enumerate(peers.mute_ports)]
                     + [ep('trickle%02d' % i, 'tcp://127.0.0.1:%d' % p) for i, p in enumerate(peers.trickle_ports)]
                     + [ep('dead%02d' % i, u) for i, u in enumerate(dead)])
        timeout, wait_timeout = 1.0, 1.0
        res = run_in_child(dict(timeout=timeout, wait_timeout=wait_timeout, fail_on_unhealthy=False,
                                endpoints=endpoints), 160, 160, timeout=60)
    finally:
        peers.close()
    bound = timeout + wait_timeout + 1.5  # generous constant for closing sockets and the context
    print('wall %.2f s, elapsed_ms %.0f, concurrency %d, states %r'
          % (res['_wall_s'], res['elapsed_ms'], res['concurrency'], states_of(res)))
    assert res['_wall_s'] <= bound and res['elapsed_ms'] <= bound * 1000
    assert len(res['endpoints']) == len(endpoints)
    for e in res['endpoints']:
        if e['name'].startswith('dead'):
            assert e['state'] in ('refused', 'timeout'), e
        else:
            assert e['state'] == 'timeout', e
    not_checked = [e for e in res['endpoints'] if e['attempts'] == 0]
    assert not_checked, 'expected some endpoints the module had no descriptors left for'
    assert all('not checked' in e['message'] for e in not_checked)
    strict_json(res)


# ------------------------------------------------------------------------------------ hostile replies
HOSTILE_REPLIES = [
    # (name, reply, expected state)
    ('nested-brackets', '[' * 1000 + ']' * 1000, 'bad_reply'),
    ('nested-objects', '{"a":' * 2000 + '1' + '}' * 2000, 'bad_reply'),
    ('nan', '{"status": "ok", "load": NaN}', 'bad_reply'),
    ('infinity', '{"status": "ok", "load": -Infinity}', 'bad_reply'),
    ('huge-float', '{"status": "ok", "load": 1e999}', 'bad_reply'),
    ('huge-int', '{"status": "ok", "n": %s}' % ('9' * 5000), 'bad_reply'),
    ('invalid-utf8', b'{"status": "ok\xff"}', 'bad_reply'),
    ('random-bytes', bytes(range(256)), 'bad_reply'),
    ('empty', b'', 'bad_reply'),
    ('multi-frame', [b'{"status": "ok"}', b'\xff' * 10, b''], 'healthy'),
    ('big-json', {'status': 'ok', 'blob': 'x' * 20000}, 'healthy'),
    ('deep-but-valid', {'status': 'ok', 'deep': json.loads('[' * 200 + ']' * 200)}, 'healthy'),
    ('too-big', b'x' * (1 << 20), 'bad_reply'),
    ('degraded-long', {'status': 'degraded', 'message': 'm' * 10000}, 'degraded'),
    ('lone-surrogate', '{"status": "ok", "s": "\\ud800"}', 'healthy'),
    ('long-status', {'status': 's' * 30000, 'message': ['x'] * 5000}, 'bad_reply'),
    ('control-chars', '{"status": "ok", "s": "\\u0000\\u001b[31m"}', 'healthy'),
]


def test_hostile_replies_stay_with_their_endpoint(farm, certdir):
    """Issue 12: a 2 KB reply of nested brackets raised RecursionError and failed the whole call;
    NaN was passed through as non-standard JSON; a 10 MB reply became a 10 MB task result."""
    replies = [r for _n, r, _s in HOSTILE_REPLIES] + [OK]
    f = farm(len(replies), lambda i, req: replies[i], curve_keys=server_keys(certdir), auth_location=certdir)
    names = [n for n, _r, _s in HOSTILE_REPLIES] + ['control']
    res = health(dict(certificates_dir=certdir, timeout=10, fail_on_unhealthy=False,
                      endpoints=[ep(n, u) for n, u in zip(names, f.urls)]))
    assert 'endpoints' in res, res
    got = {e['name']: e for e in res['endpoints']}
    expected = dict((n, s) for n, _r, s in HOSTILE_REPLIES)
    expected['control'] = 'healthy'
    assert {n: got[n]['state'] for n in names} == expected
    dumped = strict_json(res)  # standard JSON only: no NaN or Infinity anywhere
    assert len(dumped) < 80000
    for e in res['endpoints']:
        assert len(json.dumps(e['reply'], ensure_ascii=False)) <= 4098, e['name']
        assert len(e['message'] or '') <= 600, (e['name'], e['message'])
    assert got['big-json']['reply_truncated'] is True and len(got['big-json']['reply']) > 4000
    assert got['control']['reply'] == OK and got['control']['reply_truncated'] is False
    assert got['deep-but-valid']['reply_truncated'] is False
    assert got['multi-frame']['reply'] == {'status': 'ok'}
    assert 'max_reply_size' in got['too-big']['message']
    assert 'not standard JSON' in got['nan']['message']
    assert 'not valid UTF-8' in got['invalid-utf8']['message']


@pytest.mark.parametrize('expect', ['items[::0]', 'items[1:2:0] | [0]', 'sort(@)', 'abs(status)',
                                    'max_by(items, &a)'])
def test_expect_that_cannot_be_evaluated_is_bad_reply(rep_server, expect):
    """Issue 12: expect '[::0]' raised ValueError (not a JMESPathError) out of the module."""
    srv = rep_server(lambda msg: dict(OK, items=[1, 2]))
    res = health(dict(timeout=5, fail_on_unhealthy=False,
                      endpoints=[ep('bad-expect', srv.url, expect=expect), ep('fine', srv.url)]))
    assert 'endpoints' in res, res
    bad, fine = res['endpoints']
    assert bad['state'] == 'bad_reply' and 'could not be evaluated' in bad['message'], bad
    assert len(bad['message']) <= 600
    assert fine['state'] == 'healthy'


def test_reply_over_max_reply_size_is_bad_reply(curve_server, certdir):
    """Issue 12: JSON replies had no size limit (a 10 MB reply became a 10 MB task result)."""
    big = json.dumps({'status': 'ok', 'blob': 'x' * (10 * 1024 * 1024)})
    srv = curve_server(lambda msg: big)
    res = health(dict(certificates_dir=certdir, timeout=10, fail_on_unhealthy=False,
                      endpoints=[ep('big', srv.url)]))
    e = only(res)
    assert e['state'] == 'bad_reply' and 'max_reply_size' in e['message'], e
    assert len(json.dumps(res)) < 10000


@pytest.mark.parametrize('curve', [False, True], ids=['plain', 'curve'])
def test_max_reply_size_option(rep_server, curve_server, certdir, curve):
    reply = json.dumps({'status': 'ok', 'pad': 'p' * 1000})
    size = len(reply.encode())
    srv = curve_server(lambda msg: reply) if curve else rep_server(lambda msg: reply)
    base = dict(timeout=10, fail_on_unhealthy=False, endpoints=[ep('a', srv.url)])
    if curve:
        base['certificates_dir'] = certdir
    assert only(health(dict(base, max_reply_size=size)))['state'] == 'healthy'
    e = only(health(dict(base, max_reply_size=size - 1)))
    assert e['state'] == 'bad_reply' and 'max_reply_size' in e['message'], e


def test_long_reply_is_truncated_and_marked(rep_server):
    reply = {'status': 'ok', 'blob': 'b' * 20000}
    srv = rep_server(lambda msg: reply)
    e = only(health(dict(timeout=5, endpoints=[ep('a', srv.url)])))
    assert e['state'] == 'healthy'
    assert e['reply_truncated'] is True
    assert isinstance(e['reply'], str) and 4000 < len(e['reply']) <= 4096
    assert json.dumps(reply).startswith(e['reply'])
    assert len(json.dumps(e['reply'], ensure_ascii=False)) <= 4098


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize('option, value', [
    ('timeout', 'nan'), ('timeout', 'inf'), ('timeout', '-inf'), ('timeout', '1e300'), ('timeout', 3600.5),
    ('timeout', -1), ('wait_timeout', 'nan'), ('wait_timeout', 'inf'), ('wait_timeout', 3601),
    ('wait_timeout', -0.5), ('max_reply_size', 0), ('max_reply_size', 64 * 1024 * 1024),
])
def test_out_of_range_numbers_are_rejected(option, value):
    """Issue 12: 'timeout: nan' spun forever at 72% CPU; 'inf' and '1e300' crashed with tracebacks."""
    t0 = time.monotonic()
    res = health({option: value, 'endpoints': [ep('a', 'tcp://127.0.0.1:%d' % free_tcp_port())]})
    assert res.get('failed') is True, res
    assert option in res['msg'] and 'endpoints' not in res, res['msg']
    assert 'Traceback' not in json.dumps(res)
    assert time.monotonic() - t0 < 2


def test_largest_timeouts_are_accepted(rep_server):
    srv = rep_server(lambda msg: OK)
    res = health(dict(timeout=3600, wait_timeout=3600, endpoints=[ep('a', srv.url)]))
    assert not res.get('failed') and only(res)['state'] == 'healthy', res


@pytest.mark.parametrize('host', [
    '[1.2.3]', '-foo', 'foo-', 'a..b', '.foo', 'foo.-bar', '1.2.3', '256.1.1.1', '010.1.1.1', '1.2.3.4.5',
    '[::1', '::1', '[]', '[::1%]', '[fe80::1%%x]', 'a' * 64, '.'.join(['a' * 63] * 4) + '.com', 'a b',
    'host/x', '*',
])
def test_invalid_hosts_are_rejected(host):
    """Issue 12: '[1.2.3]' was accepted (libzmq reads it as 1.2.0.3) and '-foo' was reported refused."""
    url = 'tcp://%s:8120' % host
    res = health(dict(timeout=1, endpoints=[ep('x', url)]))
    assert res.get('failed') is True and 'endpoints' not in res, res
    assert "endpoint 'x': url" in res['msg'], res['msg']


def test_valid_hosts_are_accepted(rep_server):
    srv = rep_server(lambda msg: OK)
    dead6 = free_tcp_port()
    res = health(dict(timeout=5, fail_on_unhealthy=False, endpoints=[
        ep('ipv4', srv.url),
        ep('name', 'tcp://localhost:%d' % srv.port),
        ep('ipv6', 'tcp://[::1]:%d' % dead6),
    ]))
    assert [e['state'] for e in res['endpoints']] == ['healthy', 'healthy', 'refused'], res


@pytest.mark.parametrize('fifo', ['client.key', 'client.key_secret', 'server.key'])
def test_key_file_that_is_a_fifo_fails_instead_of_hanging(tmp_path, certdir, fifo):
    """Issue 12: a FIFO at certificates_dir/client.key hung the module (open() blocks)."""
    for f in os.listdir(certdir):
        shutil.copy(os.path.join(certdir, f), str(tmp_path / f))
    os.unlink(str(tmp_path / fifo))
    os.mkfifo(str(tmp_path / fifo))
    res = run_in_child(dict(certificates_dir=str(tmp_path), endpoints=[ep('a', 'tcp://127.0.0.1:1')]), timeout=30)
    assert res.get('failed') is True and 'endpoints' not in res, res
    assert 'not a regular file' in res['msg'] and fifo in res['msg'], res['msg']


def test_name_lookups_cannot_hold_up_the_call(rep_server, monkeypatch):
    """Host names are looked up outside libzmq's I/O thread, so a DNS server that never answers
    delays neither the other endpoints nor the deadline; a name that does not exist is 'refused';
    a look-up that fails for a local reason (EAI_SYSTEM, e.g. out of descriptors) is tried again."""
    srv = rep_server(lambda msg: OK)
    release = threading.Event()
    real_getaddrinfo = socket.getaddrinfo
    local_failures = []

    def getaddrinfo(host, *args, **kw):
        if host == 'flaky.example' and len(local_failures) < 3:
            local_failures.append(host)
            raise socket.gaierror(socket.EAI_SYSTEM, 'System error')
        if host in ('agent.example', 'flaky.example'):
            host = '127.0.0.1'
        if host == 'slow.example':
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, 'Temporary failure in name resolution')
        if host == 'nxdomain.example':
            raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
    t0 = time.monotonic()
    try:
        res = health(dict(timeout=1, fail_on_unhealthy=False, endpoints=[
            ep('named', 'tcp://agent.example:%d' % srv.port),
            ep('slow-dns', 'tcp://slow.example:%d' % srv.port),
            ep('no-such-name', 'tcp://nxdomain.example:%d' % srv.port),
            ep('local-failure', 'tcp://flaky.example:%d' % srv.port),
        ]))
    finally:
        release.set()
    wall = time.monotonic() - t0
    named, slow, missing, flaky = res['endpoints']
    assert named['state'] == 'healthy', named
    assert flaky['state'] == 'healthy' and len(local_failures) == 3, flaky
    assert slow['state'] == 'timeout' and 'not resolved' in slow['message'] and slow['attempts'] == 0, slow
    assert missing['state'] == 'refused' and 'cannot resolve host name' in missing['message'], missing
    assert wall <= 1 + 1.5


class EndlessReplyServer(object):
    """A hand-written ZMTP 3.0 REP peer (NULL mechanism) on 127.0.0.1 that answers every request with
    a multi-frame reply that never ends: 60000-byte frames, each flagged MORE. libzmq's MAXMSGSIZE
    limits each frame, not the number of frames, and buffers the message until its last frame."""

    GREETING = b'\xff' + b'\x00' * 8 + b'\x7f' + b'\x03\x00' + b'NULL' + b'\x00' * 16 + b'\x00' + b'\x00' * 31

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        import struct
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _addr = self.listener.accept()
            except OSError:
                continue
            try:
                conn.settimeout(5)
                conn.sendall(self.GREETING)
                ready = b'\x05READY' + b'\x0bSocket-Type' + struct.pack('>I', 3) + b'REP'
                conn.sendall(b'\x04' + bytes([len(ready)]) + ready)
                received = b''
                while b'health_check' not in received:  # the client's greeting, READY and request
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise OSError('closed')
                    received += chunk
                conn.sendall(b'\x01\x00')  # the empty delimiter frame, MORE
                frame = b'\x03' + struct.pack('>Q', 60000) + b'x' * 60000  # long frame, MORE
                while not self._stop.is_set():
                    conn.sendall(frame)
                    self.sent += len(frame)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self._stop.set()
        self.thread.join(5)
        self.listener.close()


def test_reply_of_endless_frames_is_cut_off():
    """MAXMSGSIZE bounds each frame, not the frames of one reply: a peer that never finishes a
    multi-frame reply made the module buffer about 600 MB per second until the timeout."""
    server = EndlessReplyServer()
    try:
        res = run_in_child(dict(timeout=3, fail_on_unhealthy=False,
                                endpoints=[ep('endless', 'tcp://127.0.0.1:%d' % server.port)]), timeout=60)
    finally:
        server.close()
    e = only(res)
    print('sent %d MB, module max RSS %d MB, %r' % (server.sent >> 20, res['_maxrss_mb'], e))
    assert e['state'] == 'bad_reply' and 'without completing a reply' in e['message'], e
    assert res['_maxrss_mb'] < 400


# ------------------------------------------------------------------------------------ reused sockets
def test_one_socket_checks_every_kind_of_endpoint_in_turn(curve_server, certdir, rogue_dir, monkeypatch):
    """Issue 12 (CPU): the module reuses a REQ socket and its monitor for one check after the other.

    With one check at a time, every endpoint runs on the same socket right after an endpoint that
    ended in another state: a late reply, a rejected handshake, a refused connection, a dropped
    connection or stale monitor events of the previous endpoint must never reach the next one.
    """
    module = load_library_module(MODULE)
    monkeypatch.setattr(module, 'MAX_CONCURRENCY', 1)

    def named(name, status='ok'):
        return lambda msg: {'status': status, 'who': name, 'request': msg.decode()}

    def late(msg):
        time.sleep(0.8)
        return {'status': 'ok', 'who': 'late'}

    servers = {n: curve_server(named(n)) for n in ('ok1', 'ok2', 'ok3', 'ok4')}
    slow = curve_server(late)
    degraded = curve_server(named('degraded', 'degraded'))
    big = curve_server(lambda msg: {'status': 'ok', 'blob': 'x' * 5000})
    wrong = z85(os.path.join(rogue_dir, 'otherserver.key'))
    dead = 'tcp://127.0.0.1:%d' % free_tcp_port()
    endpoints = [
        ep('late', slow.url), ep('ok1', servers['ok1'].url),
        ep('wrongkey', servers['ok2'].url, server_public_key=wrong), ep('ok2', servers['ok2'].url),
        ep('dead', dead), ep('ok3', servers['ok3'].url),
        ep('degraded', degraded.url), ep('ok1-again', servers['ok1'].url, request='again'),
        ep('big', big.url), ep('ok4', servers['ok4'].url),
        ep('plain-on-curve', servers['ok3'].url, server_public_key=wrong), ep('ok2-again', servers['ok2'].url),
    ]
    # wait_timeout: the checks run one after the other, and the deadline is wait_timeout + timeout.
    # Unhealthy endpoints are checked again meanwhile, on the same socket.
    res = health(dict(certificates_dir=certdir, timeout=0.5, wait_timeout=1.5, max_reply_size=1000,
                      fail_on_unhealthy=False, endpoints=endpoints))
    assert res['concurrency'] == 1, res
    got = {e['name']: e for e in res['endpoints']}
    assert {n: got[n]['state'] for n in got} == {
        'late': 'timeout', 'ok1': 'healthy', 'wrongkey': 'auth_failed', 'ok2': 'healthy', 'dead': 'refused',
        'ok3': 'healthy', 'degraded': 'degraded', 'ok1-again': 'healthy', 'big': 'bad_reply', 'ok4': 'healthy',
        'plain-on-curve': 'auth_failed', 'ok2-again': 'healthy'}, [(e['name'], e['message']) for e in res['endpoints']]
    for name in ('ok1', 'ok2', 'ok3', 'ok4', 'ok1-again', 'ok2-again'):
        assert got[name]['reply']['who'] == name.split('-')[0], got[name]
        assert got[name]['attempts'] == 1, res['endpoints']
    assert got['ok1-again']['reply']['request'] == 'again'
    assert got['ok1']['reply']['request'] == json.dumps({'action': 'health_check'})
    assert 'max_reply_size' in got['big']['message'] or 'closed after the handshake' in got['big']['message']
    assert 'wrong server public key' in got['wrongkey']['message']


def test_retries_reuse_the_socket_of_the_same_endpoint(rep_server, monkeypatch):
    """A retry (wait_timeout) of the only endpoint runs on the socket that just failed against it."""
    module = load_library_module(MODULE)
    monkeypatch.setattr(module, 'MAX_CONCURRENCY', 1)
    port = free_tcp_port()
    srv = rep_server(lambda msg: OK, port=port, start=False)
    timer = threading.Timer(0.8, srv.start)
    timer.start()
    try:
        res = health(dict(timeout=1, wait_timeout=6, endpoints=[ep('late-starter', 'tcp://127.0.0.1:%d' % port)]))
    finally:
        timer.join()
    e = only(res)
    assert e['state'] == 'healthy' and e['attempts'] > 1, e
    assert res['concurrency'] == 1
