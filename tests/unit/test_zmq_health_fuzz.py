# -*- coding: utf-8 -*-
"""Fuzz test of library/zmq_health.py (issue 12): hostile replies and random ``expect`` expressions.

Thousands of generated replies (random bytes, deep nesting, huge numbers, invalid UTF-8, several
frames, empty, NaN, oversized, random JSON) come from real CURVE REP sockets on 127.0.0.1 with a
real ThreadAuthenticator; every endpoint has a random JMESPath ``expect``. The module runs through
``main()`` with ansible-core's real AnsibleModule. It must never raise, must return a state for
every endpoint, and its result must be standard, bounded JSON.

Reproducible: the seed is printed; set ZMQ_HEALTH_FUZZ_SEED to replay one, ZMQ_HEALTH_FUZZ_REPLIES
for more replies.
"""

from __future__ import annotations

import json
import os
import random
import time

import jmespath
import pytest
import zmq
import zmq.auth

from conftest import load_library_module, run_module
from test_zmq_health import Farm

SEED = int(os.environ.get('ZMQ_HEALTH_FUZZ_SEED', '20240612'))
REPLIES = int(os.environ.get('ZMQ_HEALTH_FUZZ_REPLIES', '2400'))
PER_CALL = 300
SOCKETS = 16
STATES = {'healthy', 'degraded', 'refused', 'auth_failed', 'timeout', 'bad_reply'}
REPLY_STATES = {'healthy', 'degraded', 'bad_reply'}
FIELDS = ['status', 'message', 'ready', 'a', 'b', 'items', 'n', 'deep']
FUNCTIONS_1 = ['length', 'keys', 'values', 'sort', 'reverse', 'to_number', 'to_string', 'to_array', 'type', 'abs',
               'ceil', 'floor', 'max', 'min', 'sum', 'avg', 'not_null']
FUNCTIONS_2 = ['contains', 'starts_with', 'ends_with', 'merge', 'not_null']
FUNCTIONS_BY = ['sort_by', 'max_by', 'min_by', 'map']


# ------------------------------------------------------------------------------------ replies
def rand_text(rng, n):
    pools = ['abc ok', '\x00\x01\x1b\t\n"\\', 'äöü€', '\U0001F600', '\ufffd\ufeff', '[]{}:,']
    return ''.join(rng.choice(rng.choice(pools)) for _ in range(n))


def rand_number(rng):
    return rng.choice([
        lambda: str(rng.randint(-10 ** 6, 10 ** 6)),
        lambda: '9' * rng.randint(20, 6000),
        lambda: '-' + '1' * rng.randint(20, 5000),
        lambda: '1e%d' % rng.choice([308, 309, 400, 99999, -400, -99999]),
        lambda: '-1.5e%d' % rng.randint(300, 500),
        lambda: '0.' + '0' * rng.randint(100, 2000) + '1',
        lambda: rng.choice(['NaN', 'Infinity', '-Infinity', '-0', '0e0', '1E+2']),
        lambda: repr(rng.uniform(-1e300, 1e300)),
    ])()


def rand_json_text(rng, depth=0):
    """Random JSON-like text; sometimes not standard JSON (NaN, huge numbers, lone surrogates)."""
    r = rng.random()
    if depth > 4 or r < 0.35:
        return rng.choice([
            lambda: rand_number(rng),
            lambda: json.dumps(rand_text(rng, rng.randint(0, 40))),
            lambda: '"\\ud800x\\udfff"',
            lambda: rng.choice(['true', 'false', 'null', '"ok"', '"degraded"', '""']),
        ])()
    if r < 0.65:
        return '[' + ','.join(rand_json_text(rng, depth + 1) for _ in range(rng.randint(0, 6))) + ']'
    keys = [rng.choice(FIELDS + [rand_text(rng, 3)]) for _ in range(rng.randint(0, 6))]
    return '{' + ','.join('%s:%s' % (json.dumps(k), rand_json_text(rng, depth + 1)) for k in keys) + '}'


def rand_health_json(rng):
    """A JSON object that looks like a health reply, with random extra content."""
    status = rng.choice(['"ok"', '"ok"', '"degraded"', '"error"', 'null', '1', '[]', rand_json_text(rng, 3)])
    extra = ','.join('%s:%s' % (json.dumps(rng.choice(FIELDS)), rand_json_text(rng, 2))
                     for _ in range(rng.randint(0, 4)))
    return '{"status":%s%s}' % (status, (',' + extra) if extra else '')


def nested(rng):
    # Not near Python's recursion limit (1000), where the outcome depends on the stack depth.
    k = rng.choice([10, 31, 32, 33, 100, 200, 5000, 30000])
    kind = rng.random()
    if kind < 0.4:
        return '[' * k + ']' * k
    if kind < 0.7:
        return '{"a":' * k + '1' + '}' * k
    return '{"status":"ok","deep":' + '[' * k + ']' * k + '}'


def invalid_utf8(rng):
    text = rand_health_json(rng).encode('utf-8')
    bad = rng.choice([b'\xff', b'\xc0\xaf', b'\xed\xa0\x80', b'\xe2\x82', b'\x80', b'\xf8\x88\x80\x80\x80'])
    at = rng.randint(0, len(text))
    return text[:at] + bad + text[at:]


def rand_bytes(rng):
    return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 64, 300, 2000])))


def big(rng, max_reply_size):
    """Around max_reply_size: just under, at, or over it (over 64 KiB libzmq drops the connection)."""
    size = max(1, max_reply_size + rng.choice([-1, 0, 1, 100, 70000]))
    prefix = b'{"status":"ok","pad":"'
    if size < len(prefix) + 2:
        return b'x' * size
    return prefix + b'p' * (size - len(prefix) - 2) + b'"}'


def single(rng, max_reply_size):
    r = rng.random()
    if r < 0.12:
        return rand_bytes(rng)
    if r < 0.24:
        return nested(rng).encode()
    if r < 0.34:
        return ('{"status":"ok","n":%s}' % rand_number(rng)).encode()
    if r < 0.44:
        return invalid_utf8(rng)
    if r < 0.50:
        return b''
    if r < 0.56:
        return big(rng, max_reply_size)
    if r < 0.66:
        return rand_json_text(rng).encode('utf-8', 'surrogatepass')
    return rand_health_json(rng).encode('utf-8', 'surrogatepass')


def make_reply(rng, max_reply_size):
    """One reply: bytes (one frame) or a list of frames."""
    if rng.random() < 0.12:
        return [single(rng, max_reply_size) for _ in range(rng.randint(2, 12))]
    return single(rng, max_reply_size)


# ------------------------------------------------------------------------------------ expressions
def rand_literal(rng):
    return rng.choice(["'ok'", "'degraded'", '`1`', '`0`', '`null`', '`true`', '`[1, 2]`', '`{"a": 1}`',
                       '`"x"`', '`1e400`', "''", '`-5`'])


def rand_expr(rng, depth=0):
    if depth > 3 or rng.random() < 0.25:
        return rng.choice(FIELDS + ['@', '@', rand_literal(rng)])
    sub = lambda: rand_expr(rng, depth + 1)  # noqa: E731
    num = lambda: rng.choice(['', '0', '1', '-1', '2', '-3', '100'])  # noqa: E731
    return rng.choice([
        lambda: '%s %s %s' % (sub(), rng.choice(['==', '!=', '<', '<=', '>', '>=']), sub()),
        lambda: '%s %s %s' % (sub(), rng.choice(['&&', '||']), sub()),
        lambda: '!%s' % sub(),
        lambda: '(%s)' % sub(),
        lambda: '%s.%s' % (sub(), rng.choice(FIELDS)),
        lambda: '%s[%d]' % (sub(), rng.randint(-3, 3)),
        lambda: '%s[%s:%s:%s]' % (sub(), num(), num(), rng.choice(['', '0', '1', '-1', '2'])),
        lambda: '[%s:%s:%s]' % (num(), num(), rng.choice(['0', '-1', '1'])),
        lambda: '%s[*]' % sub(),
        lambda: '%s[]' % sub(),
        lambda: '%s.*' % sub(),
        lambda: '%s[?%s]' % (sub(), sub()),
        lambda: '%s | %s' % (sub(), sub()),
        lambda: '{x: %s, y: %s}' % (sub(), sub()),
        lambda: '[%s, %s]' % (sub(), sub()),
        lambda: '%s(%s)' % (rng.choice(FUNCTIONS_1), sub()),
        lambda: '%s(%s, %s)' % (rng.choice(FUNCTIONS_2), sub(), sub()),
        lambda: "join(',', %s)" % sub(),
        lambda: '%s(%s, &%s)' % (rng.choice(FUNCTIONS_BY), sub(), sub()),
        lambda: '%s(%s)' % (rng.choice(FUNCTIONS_1), rand_literal(rng)),
        lambda: rng.choice(['[::0]', '@[::0]', 'items[1:2:0]', 'sort(@)', 'abs(@)', 'max_by(@, &a)',
                            'to_number(@) > `1`', 'length(@) == `0`', "@ == 'pong'", 'deep[0][0][0]']),
    ])()


def compiling_exprs(rng, count):
    out = []
    while len(out) < count:
        text = rand_expr(rng)
        try:
            jmespath.compile(text)
        except Exception:
            continue
        out.append(text)
    return out


# ------------------------------------------------------------------------------------ the oracle
def _reject(name):
    raise ValueError(name)


def _finite(text):
    value = float(text)
    if value != value or value in (float('inf'), float('-inf')):
        raise ValueError(text)
    return value


def _digits(text):
    if len(text) > 4300:
        raise ValueError('long')
    return int(text)


def expected_state(frames, expect, max_reply_size):
    """The state the module's documentation promises for this reply and expect."""
    if sum(len(f) for f in frames) > max_reply_size:
        return 'bad_reply'
    raw = frames[0]
    try:
        data = raw.decode('utf-8')
    except UnicodeError:
        data, utf8 = raw.decode('utf-8', 'replace'), False
    else:
        utf8 = True
    if utf8:
        try:
            data = json.loads(data, parse_constant=_reject, parse_float=_finite, parse_int=_digits)
        except (ValueError, RecursionError):
            pass
    if isinstance(data, dict) and data.get('status') == 'degraded':
        return 'degraded'
    try:
        value = jmespath.search(expect, data)
    except Exception:
        return 'bad_reply'
    truthy = not (value is None or value is False or (isinstance(value, (str, list, dict)) and not value))
    return 'healthy' if truthy else 'bad_reply'


# ------------------------------------------------------------------------------------ the test
@pytest.fixture(scope='module')
def curve_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('fuzz-certificates'))
    zmq.auth.create_certificates(d, 'server')
    zmq.auth.create_certificates(d, 'client')
    return d


def test_fuzz_replies_and_expect(curve_dir):
    rng = random.Random(SEED)
    print('zmq_health fuzz: seed %d (ZMQ_HEALTH_FUZZ_SEED), %d replies' % (SEED, REPLIES))
    table = {}
    server = Farm(SOCKETS, lambda i, request: table[request],
                  curve_keys=zmq.auth.load_certificate(os.path.join(curve_dir, 'server.key_secret')),
                  auth_location=curve_dir).start()
    module = load_library_module('zmq_health')
    started = time.monotonic()
    seen = {}
    done = 0
    call = 0
    try:
        while done < REPLIES:
            call += 1
            n = min(PER_CALL, REPLIES - done)
            max_reply_size = rng.choice([65536, 65536, 4096, 1024 * 1024])
            exprs = compiling_exprs(rng, n)
            endpoints = []
            sizes = {}
            for i in range(n):
                request = ('fuzz-%d-%d' % (call, i)).encode()
                reply = make_reply(rng, max_reply_size)
                table[request] = reply
                frames = reply if isinstance(reply, list) else [reply]
                sizes['e%d' % i] = (sum(len(f) for f in frames), frames)
                endpoints.append(dict(name='e%d' % i, url=server.urls[i % SOCKETS], request=request.decode(),
                                      expect=exprs[i]))
            args = dict(certificates_dir=curve_dir, timeout=20, fail_on_unhealthy=False,
                        allow_degraded=rng.random() < 0.5, max_reply_size=max_reply_size, endpoints=endpoints)
            res = run_module(module, args)  # raises if the module raised

            assert 'endpoints' in res and not res.get('exception'), res.get('msg')
            assert len(res['endpoints']) == n
            strict = json.dumps(res, allow_nan=False)  # standard JSON only
            json.loads(strict)
            assert res['healthy_count'] + res['unhealthy_count'] == n
            for e, spec in zip(res['endpoints'], endpoints):
                name = spec['name']
                assert e['name'] == name and e['state'] in STATES, e
                assert e['state'] in REPLY_STATES, (e, spec)  # every server answered
                assert e['attempts'] == 1
                assert len(json.dumps(e['reply'], ensure_ascii=False, separators=(',', ':'))) <= 4098, name
                assert isinstance(e['reply_truncated'], bool)
                assert e['message'] is None or len(e['message']) <= 600, e['message']
                size, frames = sizes[name]
                assert e['state'] == expected_state(frames, spec['expect'], max_reply_size), (
                    e, spec['expect'], frames[0][:200])
                if size > max_reply_size:
                    assert 'max_reply_size' in e['message'], (e, size)
                seen[e['state']] = seen.get(e['state'], 0) + 1
            done += n
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    print('fuzz: %d replies in %d calls, %.1f s; states %r' % (done, call, elapsed, seen))
    assert done >= 2000
    assert server.requests >= done  # every request reached a server
    assert not server.errors
    # the generators reach every reply state
    assert set(seen) == REPLY_STATES, seen


def test_fuzz_expect_that_does_not_compile_is_an_argument_error():
    """Random expressions JMESPath cannot compile fail the call before any I/O, with a clear message."""
    rng = random.Random(SEED + 1)
    module = load_library_module('zmq_health')
    invalid = []
    while len(invalid) < 60:
        text = rand_expr(rng)
        if rng.random() < 0.5:
            text = text[:rng.randint(0, len(text))] + rng.choice(['[', '(', '&', '`', "'", '|', '.', '!', '?'])
        try:
            jmespath.compile(text)
        except Exception:
            invalid.append(text)
    for text in invalid:
        res = run_module(module, dict(endpoints=[dict(name='x', url='tcp://127.0.0.1:1', expect=text)]))
        assert res.get('failed') is True and 'endpoints' not in res, (text, res)
        assert "endpoint 'x', option expect: invalid JMESPath expression" in res['msg'], (text, res['msg'])
        assert 'Traceback' not in json.dumps(res)


def test_fuzz_repeated_replies_on_reused_sockets(curve_dir, monkeypatch):
    """Issue 12 (CPU): few sockets take turns (one check after the other), and the same reply bytes
    come back for many endpoints with different expressions, so each distinct (expect, reply) is
    evaluated once and reused. Every endpoint must still get exactly the state of its own reply."""
    rng = random.Random(SEED + 2)
    module = load_library_module('zmq_health')
    monkeypatch.setattr(module, 'MAX_CONCURRENCY', 5)
    max_reply_size = 65536
    pool = [make_reply(rng, max_reply_size) for _ in range(25)] + [b'{"status": "ok"}', b'pong', b'',
                                                                   b'{"status": "degraded"}']
    exprs = compiling_exprs(rng, 6) + ["status == 'ok'", "@ == 'pong'"]
    table = {}
    server = Farm(SOCKETS, lambda i, request: table[request],
                  curve_keys=zmq.auth.load_certificate(os.path.join(curve_dir, 'server.key_secret')),
                  auth_location=curve_dir).start()
    try:
        n = 300
        endpoints = []
        frames_of = {}
        for i in range(n):
            request = 'repeat-%d' % i
            reply = rng.choice(pool)
            table[request.encode()] = reply
            frames_of['e%d' % i] = reply if isinstance(reply, list) else [reply]
            endpoints.append(dict(name='e%d' % i, url=server.urls[i % SOCKETS], request=request,
                                  expect=rng.choice(exprs)))
        res = run_module(module, dict(certificates_dir=curve_dir, timeout=20, fail_on_unhealthy=False,
                                      max_reply_size=max_reply_size, endpoints=endpoints))
    finally:
        server.stop()
    assert 'endpoints' in res and not res.get('exception'), res.get('msg')
    assert res['concurrency'] <= 5
    json.loads(json.dumps(res, allow_nan=False))
    seen = set()
    for e, spec in zip(res['endpoints'], endpoints):
        assert e['name'] == spec['name'] and e['attempts'] == 1, e
        assert e['state'] == expected_state(frames_of[spec['name']], spec['expect'], max_reply_size), (
            e, spec['expect'], frames_of[spec['name']][0][:200])
        seen.add(e['state'])
    assert seen == REPLY_STATES, seen
