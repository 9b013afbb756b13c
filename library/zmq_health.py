#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to this project
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: zmq_health
short_description: Check the health of many ZeroMQ (optionally CurveZMQ) REP endpoints at once
description:
  - Sends one request to every endpoint in O(endpoints) over a ZeroMQ REQ socket and classifies each
    endpoint as V(healthy), V(degraded), V(refused), V(auth_failed), V(timeout) or V(bad_reply).
  - All endpoints are checked concurrently in one process (one ZeroMQ context, one poller over all
    REQ sockets and their monitor sockets), so checking N endpoints costs about one O(timeout), not N.
  - ZeroMQ's socket monitor is used to classify failures as soon as they are known. A refused or
    unreachable connection is reported as V(refused) on the first failed connect, and a rejected CURVE
    handshake (wrong server public key, client key not authorised by the server's authenticator,
    security mechanism mismatch) is reported as V(auth_failed) right away, instead of waiting for the timeout.
  - The reply is parsed as JSON and the JMESPath expression O(expect) must be truthy on it
    (JMESPath truthiness, false for null, false, empty string, empty list and empty object).
    If the reply is not JSON, O(expect) is evaluated on the raw reply string, so C(@ == 'pong')
    checks an old agent that answers the string C(pong) to the request C(ping).
  - A JSON reply whose C(status) is C(degraded) is reported as V(degraded), before O(expect) is evaluated.
  - Read-only. The module never reports C(changed) and fully supports check mode, so drift checks can run it.
version_added: "1.0.0"
author:
  - AI system provisioning team (@ai-system-provisioning)
requirements:
  - python >= 3.6
  - pyzmq (Debian package C(python3-zmq)); CURVE needs a libzmq with CURVE support (libzmq >= 4.3 for handshake events)
  - jmespath (Debian package C(python3-jmespath))
options:
  endpoints:
    description:
      - The endpoints to check, in the order the results are returned. Must not be empty; names must be unique.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: Name of the endpoint, used in results and messages.
        type: str
        required: true
      url:
        description:
          - ZeroMQ endpoint in the form C(tcp://HOST:PORT) (port 1-65535). IPv6 addresses are written in
            brackets, for example C(tcp://[::1]:8120).
        type: str
        required: true
      request:
        description: Request for this endpoint; overrides the module-level O(request).
        type: raw
      expect:
        description: JMESPath expression for this endpoint; overrides the module-level O(expect).
        type: str
      server_public_key:
        description:
          - Z85 public key of this endpoint's server; overrides O(server_public_key) and the C(server.key)
            of O(certificates_dir). Needs client keys (O(certificates_dir) or O(client_public_key)/O(client_secret_key)).
        type: str
  timeout:
    description: Seconds to wait for each attempt's reply.
    type: float
    default: 3
  wait_timeout:
    description:
      - If greater than 0, unhealthy endpoints are checked again with fresh sockets (about every 0.3 s,
        never past the deadline) until all are healthy or O(wait_timeout) seconds have passed since the
        start. A server that starts late is found healthy.
      - An attempt that starts before the deadline may run for up to O(timeout), so the module returns
        after at most about O(wait_timeout) + O(timeout) seconds.
    type: float
    default: 0
  fail_on_unhealthy:
    description: Fail the task if any endpoint is unhealthy. With V(false) the results are only reported.
    type: bool
    default: true
  allow_degraded:
    description:
      - Count V(degraded) endpoints as passing (C(healthy=true), included in RV(healthy_count)).
        Their RV(endpoints[].state) stays V(degraded).
    type: bool
    default: false
  request:
    description:
      - Request sent to every endpoint that has no own C(request). A dict or list is sent as JSON; a string is
        sent as-is (UTF-8).
    type: raw
    default: {"action": "health_check"}
  expect:
    description:
      - JMESPath expression evaluated on the JSON reply (or on the raw reply string if the reply is not JSON).
        The endpoint is V(healthy) when the result is truthy.
      - All expressions are compiled before any network I/O; an invalid one fails the task.
    type: str
    default: "status == 'ok'"
  certificates_dir:
    description:
      - Use CurveZMQ with the keys in this directory, as the agents do. C(client.key_secret) is the client
        key pair, C(server.key) the server's public key. If C(client.key) exists it must match C(client.key_secret).
      - Mutually exclusive with O(server_public_key), O(client_public_key) and O(client_secret_key).
    type: path
  client_key_name:
    description:
      - Base name of the client key pair in O(certificates_dir), for example V(health-probe) to use
        C(health-probe.key_secret) instead of the agents' C(client.key_secret).
    type: str
    default: client
  server_public_key:
    description: Z85 public key (40 characters) of the servers. Requires O(client_public_key) and O(client_secret_key).
    type: str
  client_public_key:
    description: Z85 public key of the client (40 characters). Required together with O(client_secret_key).
    type: str
  client_secret_key:
    description: Z85 secret key of the client (40 characters). Never returned or logged.
    type: str
attributes:
  check_mode:
    support: full
    description: The module is read-only and behaves the same in check mode.
  diff_mode:
    support: none
notes:
  - Without O(certificates_dir) or client keys the check uses plain TCP (ZeroMQ's NULL mechanism).
  - With CURVE, an endpoint whose server drops the connection during the handshake is V(auth_failed).
    libzmq 4.3 reports a wrong server public key as HANDSHAKE_FAILED_NO_DETAIL followed by DISCONNECTED,
    and a client key that the server's ZAP handler (for example pyzmq's ThreadAuthenticator) does not
    authorise as HANDSHAKE_FAILED_AUTH with ZAP status 400.
  - Every failed handshake is V(auth_failed). That includes a plain-TCP check of a CURVE server
    (security mechanism mismatch) and a peer that accepts TCP connections but closes them without completing
    the ZMTP handshake.
  - RV(endpoints[].latency_ms) is the time from sending the request to the reply, or to the moment the failure
    was known.
seealso:
  - module: zmq_curve_keypair
'''

EXAMPLES = r'''
- name: Check the MainPC agents over CURVE, waiting up to 60 s for late starters
  zmq_health:
    certificates_dir: /opt/ai-system/certificates
    timeout: 5
    wait_timeout: 60
    endpoints:
      - {name: system-digital-twin, url: "tcp://192.168.100.16:8120"}
      - {name: task-router, url: "tcp://192.168.100.16:9571"}
      - {name: tts-agent, url: "tcp://192.168.100.16:6563"}

- name: Drift check (read-only, also in check mode), accept degraded agents, only report
  zmq_health:
    certificates_dir: /opt/ai-system/certificates
    allow_degraded: true
    fail_on_unhealthy: false
    endpoints: "{{ agent_health_endpoints }}"
  check_mode: true
  register: zmq_state

- name: Old agent variant that answers the string "pong" to "ping", and one answering "success"
  zmq_health:
    endpoints:
      - name: legacy-responder
        url: tcp://192.168.100.16:5638
        request: ping
        expect: "@ == 'pong'"
      - name: legacy-router
        url: tcp://192.168.100.17:6780
        expect: "status == 'success' || status == 'ok'"

- name: Explicit keys (the secret comes from a vault)
  zmq_health:
    server_public_key: "{{ zmq_server_public_key }}"
    client_public_key: "{{ zmq_client_public_key }}"
    client_secret_key: "{{ vault_zmq_client_secret_key }}"
    endpoints:
      - {name: translator-agent, url: "tcp://192.168.100.17:6789"}
'''

RETURN = r'''
endpoints:
  description: One entry per endpoint, in input order.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Endpoint name.
      type: str
      sample: system-digital-twin
    url:
      description: Endpoint URL.
      type: str
      sample: tcp://192.168.100.16:8120
    state:
      description: One of V(healthy), V(degraded), V(refused), V(auth_failed), V(timeout), V(bad_reply).
      type: str
      sample: healthy
    healthy:
      description: Whether the endpoint passes (V(healthy), or V(degraded) with O(allow_degraded=true)).
      type: bool
    latency_ms:
      description: Milliseconds from sending the request to the reply or to the detected failure (last attempt).
      type: float
      sample: 1.7
    reply:
      description: The parsed JSON reply, or the reply string (at most 2048 characters) if it is not JSON; null without a reply.
      type: raw
      sample: {"status": "ok", "ready": true}
    message:
      description: Human-readable detail for states other than V(healthy); null for V(healthy).
      type: str
      sample: connection refused or host unreachable
    attempts:
      description: Number of attempts made for this endpoint.
      type: int
      sample: 1
healthy_count:
  description: Number of endpoints that pass.
  returned: always
  type: int
  sample: 5
unhealthy_count:
  description: Number of endpoints that do not pass.
  returned: always
  type: int
  sample: 0
attempts:
  description: Highest number of attempts made for any endpoint (1 without O(wait_timeout)).
  returned: always
  type: int
  sample: 1
elapsed_ms:
  description: Time spent inside the module, from argument parsing to the result, in milliseconds.
  returned: always
  type: float
  sample: 84.2
msg:
  description: Summary; names every unhealthy endpoint and its state.
  returned: always
  type: str
  sample: "2 of 5 ZMQ endpoints unhealthy: tts-agent (tcp://192.168.100.16:6563): auth_failed; responder (tcp://192.168.100.16:6637): timeout"
'''

import json
import math
import re
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.zmq_curve import (
    HAS_ZMQ,
    ZMQ_IMPORT_ERROR,
    CurveKeyError,
    apply_client_curve,
    client_keys_from_dir,
    client_keys_from_options,
    has_curve,
    validate_z85_key,
)

try:
    import jmespath
    import jmespath.exceptions
    HAS_JMESPATH = True
    JMESPATH_IMPORT_ERROR = None
except ImportError:
    jmespath = None
    HAS_JMESPATH = False
    JMESPATH_IMPORT_ERROR = traceback.format_exc()

if HAS_ZMQ:
    import zmq
    from zmq.utils.monitor import recv_monitor_message

HEALTHY = 'healthy'
DEGRADED = 'degraded'
REFUSED = 'refused'
AUTH_FAILED = 'auth_failed'
TIMEOUT = 'timeout'
BAD_REPLY = 'bad_reply'

DEFAULT_REQUEST = {'action': 'health_check'}
DEFAULT_EXPECT = "status == 'ok'"
RETRY_INTERVAL = 0.3
MAX_REPLY_CHARS = 2048

URL_RE = re.compile(r'^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>[0-9]{1,5})$')


class ConfigError(Exception):
    pass


def _event(name):
    return getattr(zmq, name, None) if HAS_ZMQ else None


def _protocol_error_name(value):
    for attr in dir(zmq):
        if attr.startswith('PROTOCOL_ERROR_') and getattr(zmq, attr) == value:
            return attr[len('PROTOCOL_ERROR_'):]
    return '0x%x' % value


def jmespath_truthy(value):
    """JMESPath truthiness: false, null, '', [] and {} are false; everything else (also 0) is true."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, dict)) and len(value) == 0:
        return False
    return True


class Target(object):
    """A validated endpoint."""

    def __init__(self, index, name, url, ipv6, request_bytes, expect_text, expect, server_key):
        self.index = index
        self.name = name
        self.url = url
        self.ipv6 = ipv6
        self.request_bytes = request_bytes
        self.expect_text = expect_text
        self.expect = expect
        self.server_key = server_key


class Probe(object):
    """One attempt against one endpoint: a REQ socket plus its monitor socket."""

    def __init__(self, target, keys, timeout, allow_degraded):
        self.target = target
        self.keys = keys
        self.curve = keys is not None
        self.timeout = timeout
        self.allow_degraded = allow_degraded
        self.sock = None
        self.monitor = None
        self.t0 = None
        self.deadline = None
        self.done = False
        self.state = None
        self.message = None
        self.reply = None
        self.latency_ms = None
        self.tcp_attempted = False
        self.connected = False
        self.handshake_ok = False
        self.lost_after_handshake = False

    def start(self, ctx):
        sock = ctx.socket(zmq.REQ)
        self.sock = sock
        sock.setsockopt(zmq.LINGER, 0)
        # IMMEDIATE is deliberately not set: a REQ socket with IMMEDIATE has no pipe until the
        # handshake completed, so the non-blocking send below would fail with EAGAIN. Without it the
        # request is queued on the pipe created by connect() and sent once the connection is up.
        if self.target.ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        if self.curve:
            apply_client_curve(sock, self.keys, self.target.server_key)
        self.monitor = sock.get_monitor_socket()
        sock.connect(self.target.url)
        sock.send(self.target.request_bytes, zmq.NOBLOCK)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.timeout

    # -- classification -------------------------------------------------------------------
    def finish(self, state, message=None, reply=None):
        if self.done:
            return
        self.done = True
        self.state = state
        self.message = message
        self.reply = reply
        self.latency_ms = round((time.monotonic() - self.t0) * 1000.0, 1)

    def passes(self):
        return self.state == HEALTHY or (self.state == DEGRADED and self.allow_degraded)

    def on_monitor(self):
        while not self.done:
            try:
                msg = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_event(int(msg['event']), int(msg['value']))

    def _on_event(self, event, value):
        if event == _event('EVENT_CONNECT_DELAYED'):
            self.tcp_attempted = True
        elif event == _event('EVENT_CONNECTED'):
            self.connected = True
        elif event == _event('EVENT_HANDSHAKE_SUCCEEDED'):
            self.handshake_ok = True
        elif event == _event('EVENT_HANDSHAKE_FAILED_AUTH'):
            # The server's ZAP handler (e.g. ThreadAuthenticator) rejected us: status 400 = denied.
            if self.curve:
                self.finish(AUTH_FAILED, 'the server rejected the CURVE client key (ZAP status %d): '
                                         'client public key not authorised' % value)
            else:
                self.finish(AUTH_FAILED, 'the server rejected the connection (ZAP status %d)' % value)
        elif event == _event('EVENT_HANDSHAKE_FAILED_PROTOCOL'):
            if value == getattr(zmq, 'PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH', -1):
                if self.curve:
                    detail = 'the server does not use CURVE'
                else:
                    detail = 'the server requires a security mechanism (CURVE?) but the check uses plain TCP'
                self.finish(AUTH_FAILED, 'security mechanism mismatch: %s' % detail)
            else:
                self.finish(AUTH_FAILED, 'ZMTP handshake protocol error %s' % _protocol_error_name(value))
        elif event == _event('EVENT_HANDSHAKE_FAILED_NO_DETAIL') or (
                event == _event('EVENT_DISCONNECTED') and not self.handshake_ok):
            # A CURVE server that cannot decrypt our HELLO (wrong server public key) drops the
            # connection silently; libzmq 4.3 reports HANDSHAKE_FAILED_NO_DETAIL + DISCONNECTED.
            # For a plain check of a CURVE server it is a race whether the client first sees the
            # mechanism mismatch (HANDSHAKE_FAILED_PROTOCOL) or the server's close (NO_DETAIL).
            if self.curve:
                self.finish(AUTH_FAILED, 'the server closed the connection during the CURVE handshake '
                                         '(wrong server public key, or the server does not use CURVE)')
            else:
                self.finish(AUTH_FAILED, 'the server closed the connection during the ZMTP handshake '
                                         '(it requires CURVE, or it is not a ZeroMQ endpoint)')
        elif event == _event('EVENT_DISCONNECTED'):
            self.lost_after_handshake = True
        elif event in (_event('EVENT_CLOSED'), _event('EVENT_CONNECT_RETRIED')) and not self.connected:
            if self.tcp_attempted:
                self.finish(REFUSED, 'connection refused or host unreachable')
            else:
                self.finish(REFUSED, 'could not connect (host name not resolvable?)')

    def on_reply(self):
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self.finish_with_reply(frames[0] if frames else b'')

    def finish_with_reply(self, raw):
        text = raw.decode('utf-8', 'replace')
        try:
            data = json.loads(text)
            is_json = True
        except ValueError:
            data = text
            is_json = False
        shown = data if is_json else text[:MAX_REPLY_CHARS]
        if is_json and isinstance(data, dict) and data.get('status') == DEGRADED:
            detail = data.get('message')
            self.finish(DEGRADED, 'the server reports status degraded' + (': %s' % detail if detail else ''),
                        reply=shown)
            return
        try:
            value = self.target.expect.search(data)
        except jmespath.exceptions.JMESPathError as e:
            self.finish(BAD_REPLY, 'expect %r could not be evaluated on the reply: %s'
                        % (self.target.expect_text, e), reply=shown)
            return
        if jmespath_truthy(value):
            self.finish(HEALTHY, None, reply=shown)
        elif not is_json:
            self.finish(BAD_REPLY, 'reply is not JSON and expect %r is false on the raw reply %r'
                        % (self.target.expect_text, text[:80]), reply=shown)
        else:
            detail = ''
            if isinstance(data, dict):
                parts = ['%s: %r' % (k, data[k]) for k in ('status', 'message') if k in data]
                detail = ' (%s)' % ', '.join(parts) if parts else ''
            self.finish(BAD_REPLY, 'expect %r is false on the reply%s' % (self.target.expect_text, detail),
                        reply=shown)

    def on_timeout(self):
        if self.handshake_ok:
            if self.lost_after_handshake:
                msg = 'connection lost after the handshake; no reply within %gs' % self.timeout
            else:
                msg = 'connected, but no reply within %gs' % self.timeout
        elif self.connected:
            msg = 'TCP connected, but the ZMTP%s handshake did not complete within %gs' % (
                '/CURVE' if self.curve else '', self.timeout)
        else:
            msg = 'no TCP connection within %gs' % self.timeout
        self.finish(TIMEOUT, msg)

    def close(self):
        for sock in (self.sock,):
            if sock is not None:
                try:
                    sock.disable_monitor()
                except Exception:
                    pass
        for sock in (self.monitor, self.sock):
            if sock is not None:
                try:
                    sock.close(linger=0)
                except Exception:
                    pass
        self.sock = self.monitor = None

    def result(self, attempts):
        return dict(name=self.target.name, url=self.target.url, state=self.state, healthy=self.passes(),
                    latency_ms=self.latency_ms, reply=self.reply, message=self.message, attempts=attempts)


def check_endpoints(targets, keys, timeout, wait_timeout=0.0, allow_degraded=False,
                    retry_interval=RETRY_INTERVAL):
    """Check all targets concurrently; return (list of result dicts in input order, max attempts)."""
    n = len(targets)
    results = [None] * n
    attempts = [0] * n
    start = time.monotonic()
    wait_deadline = start + max(0.0, wait_timeout)
    ctx = zmq.Context()
    active = {}     # socket -> probe (both REQ and monitor sockets)
    probes = []     # active probes
    scheduled = [(start, t) for t in targets]
    poller = zmq.Poller()
    try:
        try:
            ctx.setsockopt(zmq.MAX_SOCKETS, max(1024, 3 * n + 64))
        except Exception:
            pass
        while probes or scheduled:
            now = time.monotonic()
            due = [s for s in scheduled if s[0] <= now]
            if due:
                scheduled = [s for s in scheduled if s[0] > now]
                for _at, target in due:
                    probe = Probe(target, keys, timeout, allow_degraded)
                    attempts[target.index] += 1
                    try:
                        probe.start(ctx)
                    except zmq.ZMQError as e:
                        probe.t0 = probe.t0 or time.monotonic()
                        probe.finish(REFUSED, 'cannot connect: %s' % e)
                    probes.append(probe)
                    if not probe.done:
                        active[probe.sock] = probe
                        active[probe.monitor] = probe
                        poller.register(probe.sock, zmq.POLLIN)
                        poller.register(probe.monitor, zmq.POLLIN)

            # Finished probes are collected at the end of every round, so only probes whose start()
            # failed can be done here; then do not wait.
            wakeups = [p.deadline for p in probes if not p.done] + [s[0] for s in scheduled]
            if any(p.done for p in probes) or not wakeups:
                wait_ms = 0
            else:
                wait_ms = int(math.ceil(max(0.0, min(wakeups) - time.monotonic()) * 1000.0))
            if active:
                for sock, _ev in poller.poll(wait_ms):
                    probe = active.get(sock)
                    if probe is None or probe.done:
                        continue
                    if sock is probe.monitor:
                        probe.on_monitor()
                    else:
                        probe.on_reply()
            elif wait_ms:
                time.sleep(wait_ms / 1000.0)  # only retries are scheduled: pause between attempts

            now = time.monotonic()
            still = []
            for probe in probes:
                if not probe.done and now >= probe.deadline:
                    probe.on_timeout()
                if not probe.done:
                    still.append(probe)
                    continue
                for sock in (probe.sock, probe.monitor):
                    if sock is not None:
                        active.pop(sock, None)
                        try:
                            poller.unregister(sock)
                        except KeyError:
                            pass
                probe.close()
                idx = probe.target.index
                results[idx] = probe.result(attempts[idx])
                if not probe.passes() and wait_timeout > 0 and now < wait_deadline:
                    scheduled.append((min(now + retry_interval, wait_deadline), probe.target))
            probes = still
    finally:
        for probe in probes:
            probe.close()
        ctx.destroy(linger=0)
    return results, max(attempts) if attempts else 0


# ------------------------------------------------------------------------------------ options
def _encode_request(request):
    if isinstance(request, bytes):
        return request
    if isinstance(request, str):
        return request.encode('utf-8')
    return json.dumps(request).encode('utf-8')


def build_targets(params):
    endpoints = params['endpoints']
    if not endpoints:
        raise ConfigError('endpoints must be a non-empty list')
    seen = {}
    duplicates = []
    for ep in endpoints:
        name = ep['name']
        if name in seen and name not in duplicates:
            duplicates.append(name)
        seen[name] = True
    if duplicates:
        raise ConfigError('endpoint names must be unique; duplicated: %s' % ', '.join(duplicates))

    expect_cache = {}

    def compile_expect(text, where):
        if text in expect_cache:
            return expect_cache[text]
        if not text or not text.strip():
            raise ConfigError('%s: expect must not be empty' % where)
        try:
            compiled = jmespath.compile(text)
        except jmespath.exceptions.JMESPathError as e:
            raise ConfigError('%s: invalid JMESPath expression %r: %s' % (where, text, str(e).strip()))
        expect_cache[text] = compiled
        return compiled

    default_expect_text = params['expect'] if params['expect'] is not None else DEFAULT_EXPECT
    compile_expect(default_expect_text, 'option expect')
    default_request = params['request'] if params['request'] is not None else DEFAULT_REQUEST

    targets = []
    for index, ep in enumerate(endpoints):
        where = 'endpoint %r' % ep['name']
        if not ep['name']:
            raise ConfigError('endpoint #%d: name must not be empty' % (index + 1))
        url = (ep['url'] or '').strip()
        match = URL_RE.match(url)
        if not match:
            raise ConfigError('%s: url %r must look like tcp://HOST:PORT' % (where, ep['url']))
        port = int(match.group('port'))
        if not 1 <= port <= 65535:
            raise ConfigError('%s: url %r has port %d outside 1..65535' % (where, url, port))
        expect_text = ep.get('expect') if ep.get('expect') is not None else default_expect_text
        expect = compile_expect(expect_text, '%s, option expect' % where)
        request = ep.get('request') if ep.get('request') is not None else default_request
        try:
            request_bytes = _encode_request(request)
        except (TypeError, ValueError) as e:
            raise ConfigError('%s: request cannot be encoded: %s' % (where, e))
        server_key = None
        if ep.get('server_public_key'):
            try:
                server_key = validate_z85_key(ep['server_public_key'], '%s: server_public_key' % where)
            except CurveKeyError as e:
                raise ConfigError(str(e))
        targets.append(Target(index, ep['name'], url, match.group('host').startswith('['),
                              request_bytes, expect_text, expect, server_key))
    return targets


def build_keys(params, targets):
    """Return CurveClientKeys or None (plain TCP); validates that every target has a server key."""
    certificates_dir = params['certificates_dir']
    have_client_keys = bool(params['client_public_key'] or params['client_secret_key'])
    need_server = any(t.server_key is None for t in targets)
    if certificates_dir:
        name = params['client_key_name']
        if not name or '/' in name:
            raise ConfigError("client_key_name must be a file name without '/' (got %r)" % name)
        keys = client_keys_from_dir(certificates_dir, need_server_key=need_server, client_name=name)
    elif have_client_keys:
        keys = client_keys_from_options(params['client_public_key'], params['client_secret_key'],
                                        params['server_public_key'])
        if keys.server_public_key is None:
            missing = [t.name for t in targets if t.server_key is None]
            if missing:
                raise ConfigError('CURVE client keys given, but no server_public_key (module option or per '
                                  'endpoint) for endpoint(s): %s' % ', '.join(missing))
    else:
        with_key = [t.name for t in targets if t.server_key is not None]
        if with_key:
            raise ConfigError('server_public_key given for endpoint(s) %s, but no client keys: set '
                              'certificates_dir or client_public_key/client_secret_key' % ', '.join(with_key))
        return None
    if not has_curve():
        raise ConfigError('CURVE requested but the installed libzmq has no CURVE support')
    return keys


def summarize(results):
    bad = [r for r in results if not r['healthy']]
    total = len(results)
    if not bad:
        return '%d of %d ZMQ endpoints healthy' % (total, total)
    return '%d of %d ZMQ endpoints unhealthy: %s' % (
        len(bad), total, '; '.join('%s (%s): %s' % (r['name'], r['url'], r['state']) for r in bad))


def main():
    started = time.monotonic()
    module = AnsibleModule(
        argument_spec=dict(
            endpoints=dict(type='list', elements='dict', required=True, options=dict(
                name=dict(type='str', required=True),
                url=dict(type='str', required=True),
                request=dict(type='raw'),
                expect=dict(type='str'),
                server_public_key=dict(type='str', no_log=False),
            )),
            timeout=dict(type='float', default=3.0),
            wait_timeout=dict(type='float', default=0.0),
            fail_on_unhealthy=dict(type='bool', default=True),
            allow_degraded=dict(type='bool', default=False),
            request=dict(type='raw', default=DEFAULT_REQUEST),
            expect=dict(type='str', default=DEFAULT_EXPECT),
            certificates_dir=dict(type='path'),
            client_key_name=dict(type='str', default='client'),
            server_public_key=dict(type='str', no_log=False),
            client_public_key=dict(type='str', no_log=False),
            client_secret_key=dict(type='str', no_log=True),
        ),
        mutually_exclusive=[
            ['certificates_dir', 'server_public_key'],
            ['certificates_dir', 'client_public_key'],
            ['certificates_dir', 'client_secret_key'],
        ],
        required_together=[['client_public_key', 'client_secret_key']],
        required_by={'server_public_key': ['client_public_key', 'client_secret_key']},
        supports_check_mode=True,
    )
    if not HAS_ZMQ:
        module.fail_json(msg=missing_required_lib('pyzmq (python3-zmq)'), exception=ZMQ_IMPORT_ERROR)
    if not HAS_JMESPATH:
        module.fail_json(msg=missing_required_lib('jmespath (python3-jmespath)'), exception=JMESPATH_IMPORT_ERROR)

    p = module.params
    if p['timeout'] <= 0:
        module.fail_json(msg='timeout must be greater than 0 (got %s)' % p['timeout'])
    if p['wait_timeout'] < 0:
        module.fail_json(msg='wait_timeout must not be negative (got %s)' % p['wait_timeout'])

    try:
        targets = build_targets(p)
        keys = build_keys(p, targets)
    except (ConfigError, CurveKeyError) as e:
        module.fail_json(msg=str(e))
    if keys is not None:
        # Belt and braces: make Ansible mask the secret anywhere in the output.
        module.no_log_values.add(keys.secret_key.decode('ascii'))

    try:
        results, attempts = check_endpoints(targets, keys, p['timeout'], p['wait_timeout'], p['allow_degraded'])
    except zmq.ZMQError as e:
        module.fail_json(msg='ZeroMQ error while checking endpoints: %s' % e)

    healthy_count = sum(1 for r in results if r['healthy'])
    unhealthy_count = len(results) - healthy_count
    out = dict(
        changed=False,
        endpoints=results,
        healthy_count=healthy_count,
        unhealthy_count=unhealthy_count,
        attempts=attempts,
        msg=summarize(results),
        elapsed_ms=round((time.monotonic() - started) * 1000.0, 1),
    )
    if unhealthy_count and p['fail_on_unhealthy']:
        module.fail_json(**out)
    module.exit_json(**out)


if __name__ == '__main__':
    main()
