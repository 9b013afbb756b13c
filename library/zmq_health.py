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
  - All endpoints are checked concurrently in one process (one ZeroMQ context, one epoll over all
    REQ sockets and their monitor sockets), so checking N endpoints costs about one O(timeout), not N.
    A REQ socket and its monitor are reused for one endpoint after the other (each check connects,
    sends its request and disconnects again), so thousands of endpoints do not cost thousands of sockets.
  - Any number of endpoints can be checked. Each endpoint being checked holds 4 file descriptors, so
    the module checks as many at once as the process's open-file limit (C(RLIMIT_NOFILE), C(ulimit -n))
    allows and starts the next ones as soon as descriptors are free again (see the notes).
  - The whole call ends within about O(wait_timeout) + O(timeout), whatever the peers do.
  - ZeroMQ's socket monitor is used to classify failures as soon as they are known. A refused or
    unreachable connection is reported as V(refused) on the first failed connect, and a rejected CURVE
    handshake (wrong server public key, client key not authorised by the server's authenticator,
    security mechanism mismatch) is reported as V(auth_failed) right away, instead of waiting for the timeout.
  - The reply is parsed as JSON and the JMESPath expression O(expect) must be truthy on it
    (JMESPath truthiness, false for null, false, empty string, empty list and empty object).
    If the reply is not standard JSON, O(expect) is evaluated on the raw reply string, so C(@ == 'pong')
    checks an old agent that answers the string C(pong) to the request C(ping).
  - A reply or an O(expect) that cannot be handled (nested too deeply, not UTF-8, an expression that
    fails on this reply, ...) makes only that endpoint V(bad_reply), with a short message. The module
    fails only for invalid arguments (and with O(fail_on_unhealthy) for unhealthy endpoints).
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
          - ZeroMQ endpoint in the form C(tcp://HOST:PORT) (port 1-65535). HOST is an IPv4 address
            (four numbers 0-255), a DNS name (labels of letters, digits, C(-) and C(_), not starting or
            ending with C(-), not all-numeric at the end) or an IPv6 address in brackets, for example
            C(tcp://[::1]:8120). Anything else, for example C([1.2.3]) or C(-foo), fails the task.
          - Host names are looked up by the module (not by libzmq's I/O thread), once per call, preferring
            IPv4. A name that does not resolve is V(refused); a look-up that has not finished by the
            deadline is V(timeout).
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
    description:
      - Seconds to wait for each attempt's reply. A finite number greater than 0 and at most 3600.
    type: float
    default: 3
  wait_timeout:
    description:
      - If greater than 0, unhealthy endpoints are checked again over a new connection (about every 0.3 s,
        never past the deadline) until all are healthy or O(wait_timeout) seconds have passed since the
        start. A server that starts late is found healthy. A finite number from 0 to 3600.
      - O(wait_timeout) + O(timeout) is a hard deadline for the whole call. No attempt runs past it, and
        endpoints still unanswered then are V(timeout). Closing the sockets adds well under a second.
    type: float
    default: 0
  max_reply_size:
    description:
      - Largest reply accepted, in bytes (all frames together); 1 to 16777216 (16 MiB).
      - libzmq drops a connection as soon as a larger frame announces itself (C(ZMQ_MAXMSGSIZE)), so
        an oversized reply is never read into memory. The endpoint is then V(bad_reply).
    type: int
    default: 65536
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
  - "Descriptors and batching: each endpoint being checked holds 4 file descriptors (the REQ socket, the
    two sockets of its monitor, the TCP connection). Before the first check the module raises its soft
    C(RLIMIT_NOFILE) towards the hard limit as far as the endpoints need, keeps 48 descriptors for
    everything else and sets the ZeroMQ context's socket limit (C(ZMQ_MAX_SOCKETS)) to match. It then
    checks up to (limit - descriptors already open - 48) / 4 endpoints at once (at most 2048), in input
    order, and starts the next ones as descriptors are released. Under C(ulimit -n 1024) that is about
    240 at a time. An endpoint is never reported V(refused) because of these limits."
  - "Reused sockets: a REQ socket and its monitor (3 of the 4 descriptors) stay open between checks and
    take the next endpoint once the last check ended (C(ZMQ_REQ_RELAXED); a late reply of the earlier
    endpoint is dropped, as REQ only takes the reply from the connection the request went out on).
    Monitor events name their endpoint address, so events of the earlier connection are ignored, and a
    socket is not used for the same address again within 1 s."
  - Batching does not extend the deadline. Endpoints that could not even be started before
    O(wait_timeout) + O(timeout) are V(timeout) with RV(endpoints[].attempts) 0 and a message saying
    they were not checked; raise the open-file limit, O(timeout) or O(wait_timeout) for very many
    slow endpoints. RV(concurrency) tells how many endpoints were checked at once.
  - "Bounded replies: replies larger than O(max_reply_size) are V(bad_reply). libzmq limits each frame
    (C(ZMQ_MAXMSGSIZE)) but not the number of frames, so every 50 ms the module also reads how many bytes
    each connection still waiting for its reply has received (C(TCP_INFO), Linux) and closes one that got
    more than 2 x O(max_reply_size) + 64 KiB as V(bad_reply): a reply of endless frames cannot fill the
    memory. Only the first frame of a multi-frame reply is evaluated. The reply is evaluated as JSON only if it is UTF-8 and standard JSON:
    C(NaN), C(Infinity), numbers out of the double range and integers of more than 4300 digits make it a
    non-JSON reply. RV(endpoints[].reply) holds at most about 4 KiB (see there); results contain only
    standard JSON."
  - Key files in O(certificates_dir) must be regular files; a FIFO or device there fails the task
    instead of blocking it.
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

- name: Thousands of endpoints; replies up to 256 KiB; give batches time under a low open-file limit
  zmq_health:
    certificates_dir: /opt/ai-system/certificates
    timeout: 5
    max_reply_size: 262144
    fail_on_unhealthy: false
    endpoints: "{{ fleet_health_endpoints }}"
  register: fleet

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
      description:
        - Milliseconds from sending the request to the reply or to the detected failure (last attempt).
        - null if no request was sent (not checked before the deadline, host name not resolvable).
      type: float
      sample: 1.7
    reply:
      description:
        - The parsed JSON reply if its compact JSON form has at most 4096 characters and it nests at most
          32 levels; otherwise the reply text (invalid UTF-8 replaced), cut so that it serialises to at most
          4096 characters. null without a reply.
      type: raw
      sample: {"status": "ok", "ready": true}
    reply_truncated:
      description: Whether RV(endpoints[].reply) was cut (then it is the beginning of the reply text).
      type: bool
      sample: false
    message:
      description: Short human-readable detail for states other than V(healthy); null for V(healthy).
      type: str
      sample: connection refused or host unreachable
    attempts:
      description: Number of attempts made for this endpoint (0 if it was not checked before the deadline).
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
concurrency:
  description:
    - Most endpoints that were being checked at the same time. Lower than the number of endpoints when
      the open-file limit made the module check them in batches (4 descriptors per endpoint being checked).
  returned: always
  type: int
  sample: 240
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

import collections
import errno
import heapq
import json
import math
import os
import re
import select
import socket
import struct
import threading
import time
import traceback

try:
    import resource
except ImportError:  # pragma: no cover - not on POSIX
    resource = None

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

    # Plain ints: pyzmq's enum flags make every ``events & POLLIN`` a slow Flag operation.
    _ZMQ_EVENTS = int(zmq.EVENTS)
    _POLLIN = int(zmq.POLLIN)

HEALTHY = 'healthy'
DEGRADED = 'degraded'
REFUSED = 'refused'
AUTH_FAILED = 'auth_failed'
TIMEOUT = 'timeout'
BAD_REPLY = 'bad_reply'

DEFAULT_REQUEST = {'action': 'health_check'}
DEFAULT_EXPECT = "status == 'ok'"
RETRY_INTERVAL = 0.3

#: Timeouts (seconds) must be finite and at most this.
MAX_TIMEOUT = 3600.0
#: Largest reply accepted (bytes, all frames together), default and upper bound of max_reply_size.
DEFAULT_MAX_REPLY_SIZE = 64 * 1024
MAX_MAX_REPLY_SIZE = 16 * 1024 * 1024
#: CURVE wraps every message in a MESSAGE command (nonce, MAC, flags), so the wire frame that
#: ZMQ_MAXMSGSIZE limits is a little longer than the reply; the exact limit is checked in Python.
CURVE_FRAME_OVERHEAD = 64
#: What goes into the result: the parsed JSON reply if its compact form has at most this many
#: characters and it nests at most MAX_REPLY_DEPTH levels; otherwise the reply text, cut to this length.
MAX_REPLY_CHARS = 4096
MAX_REPLY_DEPTH = 32
#: Longest reply detail (status, message, error text) quoted in a message.
MAX_DETAIL_CHARS = 120
#: Longest integer accepted in a JSON reply (Python >= 3.11 refuses longer ones by default).
MAX_INT_DIGITS = 4300
#: Replies of at most this many bytes (one frame) are evaluated once per distinct reply and expect,
#: for at most REPLY_CACHE_ENTRIES distinct ones (the verdict depends only on the bytes and expect).
REPLY_CACHE_MAX_BYTES = 4096
REPLY_CACHE_ENTRIES = 256
#: Descriptors one endpoint check holds: the REQ socket's and the two monitor sockets' mailboxes
#: (eventfd) and the TCP connection.
FDS_PER_PROBE = 4
#: Descriptors kept free for everything else (Python, Ansible, libzmq's threads, name look-ups).
RESERVED_FDS = 48
#: Largest number of endpoints checked at the same time, even with descriptors to spare.
MAX_CONCURRENCY = 2048
#: libzmq I/O threads: the CURVE handshakes (about 0.4 ms of crypto each) run there, so use two cores.
IO_THREADS = 2 if (os.cpu_count() or 1) > 1 else 1
#: Name look-ups run in at most this many threads at once.
RESOLVER_THREADS = 8
#: After a connection drops once the handshake succeeded, wait this long for a reply that the
#: I/O thread may still be delivering before calling the reply lost.
LOST_GRACE = 0.05
#: A slot (REQ socket + monitor, see Slot) is not used for the same endpoint address again within this
#: many seconds: monitor events of the old connection may still arrive, and only the address tells
#: them apart.
STALE_EVENTS_WINDOW = 1.0
#: libzmq bounds each frame (MAXMSGSIZE) but not the number of frames of a message, and buffers a
#: multi-frame reply until its last frame: a hostile server could make the module buffer without
#: end. So every this many seconds the byte count of the TCP connections still waiting for their
#: reply is read (TCP_INFO), and a connection that received more than twice max_reply_size plus
#: 64 KiB (room for framing and the handshake) is closed as bad_reply.
SIZE_CHECK_INTERVAL = 0.05
TCPI_BYTES_RECEIVED = struct.Struct('=Q')
#: A monitor event's first frame: event number (uint16) and value (int32), native byte order.
_EVENT_HEADER = struct.Struct('=Hi')
TCPI_BYTES_RECEIVED_OFFSET = 128  # struct tcp_info, Linux >= 4.1

URL_RE = re.compile(r'^tcp://(?P<host>\[[^\[\]]*\]|[^\[\]:/]+):(?P<port>[0-9]{1,5})$')
IPV4_RE = re.compile(r'^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}'
                     r'(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$')
LABEL_RE = re.compile(r'^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$')
ZONE_RE = re.compile(r'^[A-Za-z0-9_.-]{1,64}$')

RESOURCE_ERRNOS = frozenset(getattr(errno, name) for name in ('EMFILE', 'ENFILE', 'ENOMEM', 'ENOBUFS', 'EAGAIN')
                            if hasattr(errno, name))


class ConfigError(Exception):
    pass


_EVENTS = {}


def _event(name):
    """The value of zmq.EVENT_*, or None if this libzmq has no such event (cached: called per event)."""
    try:
        return _EVENTS[name]
    except KeyError:
        value = _EVENTS[name] = getattr(zmq, name, None) if HAS_ZMQ else None
        return value


def _protocol_error_name(value):
    for attr in dir(zmq):
        if attr.startswith('PROTOCOL_ERROR_') and getattr(zmq, attr) == value:
            return attr[len('PROTOCOL_ERROR_'):]
    return '0x%x' % value


def _monitor_events():
    """The socket events the probes act on (never MONITOR_STOPPED: see Probe.close)."""
    mask = 0
    for name in ('EVENT_CONNECTED', 'EVENT_CONNECT_RETRIED', 'EVENT_CLOSED',
                 'EVENT_DISCONNECTED', 'EVENT_HANDSHAKE_FAILED_NO_DETAIL', 'EVENT_HANDSHAKE_FAILED_PROTOCOL',
                 'EVENT_HANDSHAKE_FAILED_AUTH', 'EVENT_HANDSHAKE_SUCCEEDED'):
        mask |= getattr(zmq, name, 0) or 0
    return mask


def jmespath_truthy(value):
    """JMESPath truthiness: false, null, '', [] and {} are false; everything else (also 0) is true."""
    if value is None or value is False:
        return False
    if isinstance(value, (str, list, dict)) and len(value) == 0:
        return False
    return True


# ------------------------------------------------------------------------------------ replies
def _reject_constant(name):
    raise ValueError('%s is not standard JSON' % name)


def _parse_float(text):
    value = float(text)
    if math.isinf(value) or math.isnan(value):
        raise ValueError('number %s is out of range' % text[:20])
    return value


def _parse_int(text):
    if len(text) > MAX_INT_DIGITS:
        raise ValueError('integer with %d digits' % len(text))
    return int(text)


_JSON_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant)


def short(value, limit=MAX_DETAIL_CHARS):
    """A one-line text of VALUE of at most about LIMIT characters, for messages."""
    if not isinstance(value, str):
        try:
            value = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except Exception:
            value = '<%s>' % type(value).__name__
    value = ' '.join(value.split())
    try:
        value.encode('utf-8')
    except UnicodeError:
        value = value.encode('utf-8', 'replace').decode('utf-8')
    if len(value) > limit:
        value = value[:limit] + '...'
    return value


def _nesting_deeper_than(data, limit):
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def parse_reply(raw):
    """Return (data, is_json, why_not_json) for the reply bytes RAW; never raises."""
    try:
        text = raw.decode('utf-8')
    except UnicodeError:
        return raw.decode('utf-8', 'replace'), False, 'not valid UTF-8'
    try:
        return _JSON_DECODER.decode(text), True, None
    except RecursionError:
        return text, False, 'nested too deeply'
    except ValueError as e:
        message = str(e)
        if 'not standard JSON' in message or 'out of range' in message or 'digits' in message:
            return text, False, 'not standard JSON: %s' % short(message, 60)
        return text, False, 'not JSON'
    except Exception as e:  # defensive: whatever the decoder raises stays this reply's problem
        return text, False, 'not JSON (%s)' % type(e).__name__


def shown_reply(raw, data, is_json):
    """The reply as it goes into the result: (value, truncated).

    The parsed JSON if it is small and shallow enough, otherwise the reply text cut to MAX_REPLY_CHARS.
    """
    if is_json:
        try:
            if not _nesting_deeper_than(data, MAX_REPLY_DEPTH):
                dumped = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(',', ':'))
                if len(dumped) <= MAX_REPLY_CHARS:
                    dumped.encode('utf-8')  # refuses lone surrogates
                    return data, False
        except Exception:
            pass
    text = raw[:4 * MAX_REPLY_CHARS + 4].decode('utf-8', 'replace')
    truncated = len(text) > MAX_REPLY_CHARS or len(raw) > 4 * MAX_REPLY_CHARS + 4
    text = text[:MAX_REPLY_CHARS]
    if _json_len(text) > MAX_REPLY_CHARS + 2:
        # Quotes, backslashes and control characters grow when the result is serialised: cut more.
        low, high = 0, len(text)
        while low < high:
            middle = (low + high + 1) // 2
            if _json_len(text[:middle]) <= MAX_REPLY_CHARS + 2:
                low = middle
            else:
                high = middle - 1
        text = text[:low]
        truncated = True
    return text, truncated


def _json_len(text):
    return len(json.dumps(text, ensure_ascii=False))


def evaluate_reply(frames, target, max_reply_size):
    """(state, message, shown reply, truncated) for the reply FRAMES of TARGET; depends on nothing else."""
    size = sum(len(f) for f in frames)
    raw = frames[0] if frames else b''
    if size > max_reply_size:
        shown, truncated = shown_reply(raw, None, False)
        return (BAD_REPLY, 'the reply has %d bytes, more than max_reply_size (%d)' % (size, max_reply_size),
                shown, truncated)
    data, is_json, why = parse_reply(raw)
    shown, truncated = shown_reply(raw, data, is_json)
    if is_json and isinstance(data, dict) and data.get('status') == DEGRADED:
        detail = data.get('message')
        return (DEGRADED, 'the server reports status degraded' + (': %s' % short(detail) if detail else ''),
                shown, truncated)
    try:
        ok = jmespath_truthy(target.expect.search(data))
    except Exception as e:  # JMESPathError, ValueError ('[::0]'), RecursionError, TypeError, ...
        return (BAD_REPLY, 'expect %s could not be evaluated on the reply: %s: %s'
                % (short(target.expect_text, 80), type(e).__name__, short(str(e), 80)), shown, truncated)
    if ok:
        return HEALTHY, None, shown, truncated
    if not is_json:
        if not raw:
            what = 'the reply is empty'
        else:
            what = 'the reply is %s' % why
        return (BAD_REPLY, '%s and expect %s is false on the raw reply %s'
                % (what, short(target.expect_text, 80), short(shown if isinstance(shown, str) else '', 60)),
                shown, truncated)
    detail = ''
    if isinstance(data, dict):
        parts = ['%s: %s' % (k, short(data[k], 60)) for k in ('status', 'message') if k in data]
        detail = ' (%s)' % ', '.join(parts) if parts else ''
    return (BAD_REPLY, 'expect %s is false on the reply%s' % (short(target.expect_text, 80), detail),
            shown, truncated)


# ------------------------------------------------------------------------------------ targets
class Target(object):
    """A validated endpoint."""

    __slots__ = ('index', 'name', 'url', 'host', 'port', 'host_kind', 'request_bytes', 'expect_text', 'expect',
                 'server_key')

    def __init__(self, index, name, url, host, port, host_kind, request_bytes, expect_text, expect, server_key):
        self.index = index
        self.name = name
        self.url = url
        self.host = host
        self.port = port
        self.host_kind = host_kind
        self.request_bytes = request_bytes
        self.expect_text = expect_text
        self.expect = expect
        self.server_key = server_key


def check_host(host):
    """Return 'ipv4', 'ipv6' (bracketed) or 'name' for HOST, or raise ValueError saying why it is invalid."""
    if host.startswith('['):
        inner = host[1:-1]
        address, percent, zone = inner.partition('%')
        if percent and not ZONE_RE.match(zone):
            raise ValueError('the IPv6 zone %r is not valid' % zone)
        try:
            socket.inet_pton(socket.AF_INET6, address)
        except (OSError, ValueError):
            raise ValueError('%s is not a bracketed IPv6 address' % host)
        return 'ipv6'
    if IPV4_RE.match(host):
        return 'ipv4'
    name = host[:-1] if host.endswith('.') else host
    if not name or len(name) > 253:
        raise ValueError('a host name has 1 to 253 characters')
    labels = name.split('.')
    for label in labels:
        if not LABEL_RE.match(label):
            raise ValueError('%r is not a valid host name (labels of 1-63 letters, digits, "-" or "_", '
                             'not starting or ending with "-")' % host)
    if labels[-1].isdigit():
        raise ValueError('%r is neither an IPv4 address (four numbers 0-255) nor a host name' % host)
    return 'name'


class Resolver(object):
    """Resolves host names in daemon threads.

    libzmq would resolve names in its I/O thread, where a slow DNS server stalls every other
    endpoint and even the context's termination. Here a look-up that does not finish before the
    deadline is abandoned (the daemon thread ends with the process). A look-up that fails for a
    local reason (EAI_SYSTEM, EAI_MEMORY: for example no descriptor left) is tried again until
    ``stop()``, so the module's own limits never make a name "not resolvable".
    """

    LOCAL_ERRORS = frozenset(getattr(socket, name) for name in ('EAI_SYSTEM', 'EAI_MEMORY') if hasattr(socket, name))

    def __init__(self, max_threads=RESOLVER_THREADS):
        self._lock = threading.Lock()
        self._queue = collections.deque()
        self._results = {}
        self._pending = set()
        self._threads = 0
        self._max_threads = max_threads
        self._stop = threading.Event()

    def request(self, host):
        with self._lock:
            if host in self._results or host in self._pending:
                return
            self._pending.add(host)
            self._queue.append(host)
            if self._threads >= self._max_threads:
                return
            self._threads += 1
        thread = threading.Thread(target=self._work, name='zmq-health-resolver')
        thread.daemon = True
        try:
            thread.start()
        except RuntimeError:  # no thread left: a running worker (or the next request) takes it
            with self._lock:
                self._threads -= 1

    def result(self, host):
        """(address, ipv6, error) once HOST is resolved (address None on failure), else None."""
        with self._lock:
            return self._results.get(host)

    def forget(self, host):
        with self._lock:
            self._results.pop(host, None)

    def stop(self):
        self._stop.set()

    def _work(self):
        while True:
            with self._lock:
                if not self._queue:
                    self._threads -= 1
                    return
                host = self._queue.popleft()
            result = self.resolve(host)
            while result is None and not self._stop.wait(0.05):
                result = self.resolve(host)
            with self._lock:
                if result is not None:
                    self._results[host] = result
                self._pending.discard(host)

    @classmethod
    def resolve(cls, host):
        """(address, ipv6, None), (None, False, error), or None after a local failure."""
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in cls.LOCAL_ERRORS:
                return None
            return None, False, e.strerror or str(e)
        except (UnicodeError, ValueError) as e:  # for example an over-long label
            return None, False, short(str(e) or type(e).__name__)
        except Exception:
            return None
        for family in (socket.AF_INET, socket.AF_INET6):
            for info in infos:
                if info[0] == family:
                    return info[4][0], family == socket.AF_INET6, None
        return None, False, 'no IPv4 or IPv6 address'


# ------------------------------------------------------------------------------------ descriptors
def count_open_fds():
    """Descriptors open in this process, or None if the platform cannot tell."""
    try:
        # Linux >= 6.2 reports the number of open descriptors as the size of /proc/self/fd
        # (a few microseconds; listing the directory takes about a millisecond per thousand).
        size = os.stat('/proc/self/fd').st_size
        if size > 0:
            return size
    except OSError:
        pass
    for path in ('/proc/self/fd', '/dev/fd'):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return None


class FdBudget(object):
    """Keeps the descriptors of the probes in flight under RLIMIT_NOFILE.

    The soft limit is raised towards the hard limit as far as the endpoints need (restored at the end).
    ``cap`` is how many probes may run at once. ``free_slots`` counts the descriptors really in use
    when the estimate comes near the limit, because closed sockets release theirs asynchronously.
    """

    def __init__(self, endpoints):
        self.saved = None
        self.limit = None
        used = count_open_fds()
        self.base = used if used is not None else 64
        if resource is not None:
            try:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                need = self.base + RESERVED_FDS + FDS_PER_PROBE * min(endpoints, MAX_CONCURRENCY)
                if soft != resource.RLIM_INFINITY and soft < need and (hard == resource.RLIM_INFINITY
                                                                     or hard > soft):
                    new = need if hard == resource.RLIM_INFINITY else min(hard, need)
                    try:
                        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                        self.saved = (soft, hard)
                    except (ValueError, OSError):
                        pass
                    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                if soft != resource.RLIM_INFINITY:
                    self.limit = soft
            except (ValueError, OSError):
                self.limit = None
        if self.limit is None:
            self.cap = min(endpoints, MAX_CONCURRENCY)
        else:
            self.cap = max(1, min(endpoints, MAX_CONCURRENCY,
                                  (self.limit - self.base - RESERVED_FDS) // FDS_PER_PROBE))
        self.estimate = self.base
        self.recounted = False
        self.refill = max(1, min(64, self.cap // 8))

    def new_round(self):
        """Allow one recount of the descriptors in use (called once per round of starts)."""
        self.recounted = False

    def reserve(self, cost, unconnected, floor):
        """Whether COST more descriptors may be taken now; if so, they are counted as used.

        When the estimate comes near the limit the descriptors really open are counted (closed
        connections and sockets release theirs asynchronously); UNCONNECTED() is how many checks
        in flight may still open their TCP connection, FLOOR() an estimate if nothing can be counted.
        """
        if self.limit is None:
            return True
        if self.estimate + cost + RESERVED_FDS > self.limit:
            if self.recounted:
                return False
            self.recounted = True
            used = count_open_fds()
            self.estimate = floor() if used is None else used + unconnected()
            if self.estimate + cost + RESERVED_FDS > self.limit:
                return False
        self.estimate += cost
        return True

    def restore(self):
        if self.saved is not None:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)
            except (ValueError, OSError):
                pass
            self.saved = None

    def describe(self):
        if self.limit is None:
            return 'at most %d endpoints are checked at once' % self.cap
        return ('at most %d endpoints are checked at once: %d descriptors each, open-file limit (RLIMIT_NOFILE) %d'
                % (self.cap, FDS_PER_PROBE, self.limit))


class FdPoller(object):
    """epoll (or poll) over the ZMQ_FD descriptors of the sockets.

    zmq.Poller would call zmq_poll over every socket in flight on each wake-up, which costs a
    system call per idle socket; with hundreds of probes in flight that dominates. ZMQ_FD is
    readable when the socket has unprocessed commands; after it fires, and once after any
    send/recv, the socket's ZMQ_EVENTS tells whether a message can be received.
    """

    def __init__(self):
        self._epoll = hasattr(select, 'epoll')
        self._poller = select.epoll() if self._epoll else select.poll()
        self._flag = select.EPOLLIN if self._epoll else select.POLLIN

    def register(self, fd):
        self._poller.register(fd, self._flag)

    def unregister(self, fd):
        try:
            self._poller.unregister(fd)
        except (KeyError, OSError, ValueError):
            pass

    def poll(self, timeout):
        if self._epoll:
            return self._poller.poll(timeout)
        return self._poller.poll(int(math.ceil(timeout * 1000.0)))

    def close(self):
        if self._epoll:
            self._poller.close()


def tcp_bytes_received(fd, port):
    """Bytes received on the TCP connection FD (a libzmq descriptor) if its peer port is PORT, else None."""
    tcp_info = getattr(socket, 'TCP_INFO', None)
    if fd is None or tcp_info is None:
        return None
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    except (OSError, ValueError):
        return None
    try:
        # The descriptor may have been closed and reused since the CONNECTED event: check the peer.
        if sock.getpeername()[1] != port:
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 256)
    except (OSError, ValueError, IndexError, TypeError):
        return None
    finally:
        sock.detach()  # never close libzmq's descriptor
    end = TCPI_BYTES_RECEIVED_OFFSET + TCPI_BYTES_RECEIVED.size
    if len(info) < end:
        return None
    return TCPI_BYTES_RECEIVED.unpack(info[TCPI_BYTES_RECEIVED_OFFSET:end])[0]


# ------------------------------------------------------------------------------------ probes
class Slot(object):
    """A REQ socket with its monitor, reused for one endpoint check after the other.

    Creating and closing three sockets (the REQ socket, the monitor's two PAIR sockets) for every
    endpoint cost more CPU than the check itself. A slot keeps them: each check connects the REQ
    socket to its endpoint, sends the request and disconnects again when the check ends
    (ZMQ_REQ_RELAXED lets the socket send a new request although the last one got no reply; REQ
    only takes the reply from the connection the request went out on, so a late reply of an earlier
    check is dropped). The monitor reports the events of every connection of the socket, each with
    its endpoint address; a check only acts on events with its own address (see Probe.on_monitor),
    and a slot is not used for the same address again within STALE_EVENTS_WINDOW.
    """

    __slots__ = ('sock', 'monitor', 'monitoring', 'fds', 'probe', 'server_key', 'ipv6', 'url', 'last_url')

    def __init__(self, ctx, check, seq):
        self.sock = self.monitor = None
        self.monitoring = False
        self.probe = None
        self.server_key = None
        self.ipv6 = False
        self.url = None       # the endpoint the socket is connected to
        self.last_url = None  # the endpoint of the last check
        try:
            sock = self.sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, check.max_frame_size)
            sock.setsockopt(zmq.REQ_RELAXED, 1)
            # IMMEDIATE is deliberately not set: a REQ socket with IMMEDIATE has no pipe until the
            # handshake completed, so the non-blocking send of a check would fail with EAGAIN. Without
            # it the request is queued on the pipe created by connect() and sent once the connection is up.
            # A unique address: pyzmq's get_monitor_socket() derives it from the descriptor number,
            # which a new socket reuses while the old endpoint may still be registered.
            address = 'inproc://zmq-health-monitor-%d' % seq
            sock.monitor(address, check.monitor_events)
            self.monitoring = True
            monitor = self.monitor = ctx.socket(zmq.PAIR)
            monitor.setsockopt(zmq.LINGER, 0)
            # No high-water mark: libzmq's I/O thread blocks when it cannot queue a monitor event.
            monitor.setsockopt(zmq.RCVHWM, 0)
            monitor.connect(address)
            self.fds = (sock.getsockopt(zmq.FD), monitor.getsockopt(zmq.FD))
        except Exception:
            self.close()
            raise

    def connect(self, probe, connect_url, ipv6, keys):
        """Connect the REQ socket for PROBE and queue its request; on error the slot is clean again."""
        sock = self.sock
        if keys is not None:
            server_key = probe.target.server_key or keys.server_public_key
            if self.server_key is None:
                apply_client_curve(sock, keys, server_key)
                self.server_key = server_key
            elif server_key != self.server_key:
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
                self.server_key = server_key
        if ipv6 != self.ipv6:
            sock.setsockopt(zmq.IPV6, 1 if ipv6 else 0)
            self.ipv6 = ipv6
        sock.connect(connect_url)
        self.url = self.last_url = connect_url
        try:
            sock.send(probe.target.request_bytes, zmq.NOBLOCK)
        except Exception:
            self.disconnect()
            raise
        self.probe = probe

    def disconnect(self):
        """End the current check's connection (the slot can take the next check right away)."""
        self.probe = None
        url, self.url = self.url, None
        if url is not None and self.sock is not None:
            try:
                self.sock.disconnect(url)
            except zmq.ZMQError:
                pass  # libzmq already dropped the endpoint

    def drain(self, is_monitor):
        """Drop what arrived on one of the sockets while no check uses the slot (re-arms its ZMQ_FD)."""
        if is_monitor:
            monitor = self.monitor
            while monitor.getsockopt(_ZMQ_EVENTS) & _POLLIN:
                monitor.recv_multipart(zmq.NOBLOCK)
        else:
            self.sock.getsockopt(_ZMQ_EVENTS)

    def close(self):
        # Stop the monitor while its PAIR socket is still connected, and never ask for the
        # MONITOR_STOPPED event: libzmq sends monitor events with a blocking send, which hangs when
        # the receiving PAIR socket is gone (issue 12: disable_monitor() after a failed
        # get_monitor_socket() blocked forever). Once stopped, teardown events are dropped.
        if self.sock is not None and self.monitoring:
            try:
                self.sock.monitor(None, 0)
            except Exception:
                pass
        self.monitoring = False
        for sock in (self.monitor, self.sock):
            if sock is not None:
                try:
                    sock.close(linger=0)
                except Exception:
                    pass
        self.sock = self.monitor = None
        self.probe = None


class Probe(object):
    """One attempt against one endpoint, on a Slot (a REQ socket and its monitor)."""

    __slots__ = ('target', 'check', 'curve', 'slot', 'address', 't0', 'deadline', 'cut_short',
                 'done', 'state', 'message', 'reply', 'truncated', 'latency_ms', 'socket_failed', 'connected',
                 'handshake_ok', 'lost_at', 'tcp_fd')

    def __init__(self, target, check):
        self.target = target
        self.check = check
        self.curve = check.keys is not None
        self.slot = None
        self.address = None
        self.t0 = None
        self.deadline = None
        self.cut_short = False
        self.done = False
        self.state = None
        self.message = None
        self.reply = None
        self.truncated = False
        self.latency_ms = None
        self.socket_failed = False
        self.connected = False
        self.handshake_ok = False
        self.lost_at = None
        self.tcp_fd = None

    def start(self, slot, connect_url, ipv6):
        """Connect SLOT's socket and queue the request. On any error the slot is left idle."""
        check = self.check
        slot.connect(self, connect_url, ipv6, check.keys)
        self.slot = slot
        # libzmq names the endpoint in every monitor event exactly as it was given to connect().
        self.address = connect_url.encode('utf-8')
        self.t0 = time.monotonic()
        deadline = self.t0 + check.timeout
        if deadline > check.hard_deadline:
            # Mention it only when the attempt really lost time (it waited for a free slot or a retry).
            self.cut_short = deadline - check.hard_deadline > max(0.05, 0.05 * check.timeout)
            deadline = check.hard_deadline
        self.deadline = deadline

    # -- classification -------------------------------------------------------------------
    def finish(self, state, message=None, reply=None, truncated=False):
        if self.done:
            return
        self.done = True
        self.state = state
        self.message = message
        self.reply = reply
        self.truncated = truncated
        self.latency_ms = round((time.monotonic() - self.t0) * 1000.0, 1)
        self.check.finished.append(self)

    def passes(self):
        return self.state == HEALTHY or (self.state == DEGRADED and self.check.allow_degraded)

    def on_monitor(self):
        """Drain the monitor socket; classify as soon as an event says how the attempt ended.

        Events of the slot's earlier connections (their endpoint address differs) are dropped.
        """
        monitor = self.slot.monitor
        address = self.address
        while monitor.getsockopt(_ZMQ_EVENTS) & _POLLIN:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
            if self.done or len(frames) < 2 or frames[1] != address or len(frames[0]) < 6:
                continue
            event, value = _EVENT_HEADER.unpack_from(frames[0])
            self._on_event(event, value)

    def _on_event(self, event, value):
        if event == _event('EVENT_CONNECTED'):
            self.connected = True
            self.tcp_fd = value  # the connection's descriptor (owned by libzmq)
            if _event('EVENT_HANDSHAKE_SUCCEEDED') is None:  # libzmq < 4.3: watch it from now on
                self.check.awaiting.add(self)
        elif event == _event('EVENT_HANDSHAKE_SUCCEEDED'):
            self.handshake_ok = True
            self.check.awaiting.add(self)
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
            self.tcp_fd = None
            # After the handshake: the server closed the connection, or libzmq dropped it because
            # the reply is larger than MAXMSGSIZE or malformed. A reply that arrived just before is
            # still being delivered, so give it a moment (see on_deadline).
            if self.lost_at is None:
                self.lost_at = time.monotonic()
                self.check.push_deadline(self, self.lost_at + LOST_GRACE)
        elif event == _event('EVENT_CLOSED') and not self.connected:
            # libzmq opened a TCP socket and its connect failed (refused, unreachable, timed out).
            self.finish(REFUSED, 'connection refused or host unreachable')
        elif event == _event('EVENT_CONNECT_RETRIED') and not self.connected:
            # A retry without CLOSED: the I/O thread could not even open a TCP socket (out of
            # descriptors, no IPv6 on this host). libzmq tries again by itself; the module's own
            # limits are never reported as the endpoint's refusal.
            self.socket_failed = True

    def on_sock_ready(self):
        """The REQ socket's descriptor fired (or the socket was just armed): take the reply if there is one."""
        if self.slot.sock.getsockopt(_ZMQ_EVENTS) & _POLLIN:
            self.on_reply()

    def on_reply(self):
        try:
            frames = self.slot.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        except zmq.ZMQError as e:
            self.finish(BAD_REPLY, 'cannot receive the reply: %s' % short(str(e)))
            return
        self.finish_with_reply(frames)

    def finish_with_reply(self, frames):
        check = self.check
        if len(frames) == 1 and len(frames[0]) <= REPLY_CACHE_MAX_BYTES:
            # Agents mostly answer with the same bytes: evaluate each distinct reply once per expect.
            key = (self.target.expect_text, frames[0])
            verdict = check.reply_cache.get(key)
            if verdict is None:
                verdict = evaluate_reply(frames, self.target, check.max_reply_size)
                if len(check.reply_cache) < REPLY_CACHE_ENTRIES:
                    check.reply_cache[key] = verdict
        else:
            verdict = evaluate_reply(frames, self.target, check.max_reply_size)
        state, message, shown, truncated = verdict
        self.finish(state, message, reply=shown, truncated=truncated)

    def check_wire_size(self):
        """Close the attempt if its connection received far more than max_reply_size (see SIZE_CHECK_INTERVAL)."""
        received = tcp_bytes_received(self.tcp_fd, self.target.port)
        if received is not None and received > self.check.max_wire_bytes:
            self.finish(BAD_REPLY, 'the server sent %d bytes without completing a reply of at most max_reply_size '
                                   '(%d bytes); a reply of endless frames?' % (received, self.check.max_reply_size))

    def on_deadline(self, now, final=False):
        """Called when one of this probe's deadlines passed (FINAL: the call's deadline, end it now)."""
        if self.done:
            return
        if self.lost_at is not None and (final or now >= self.lost_at + LOST_GRACE):
            self.finish(BAD_REPLY, 'the connection was closed after the handshake without a complete reply '
                                   '(a reply larger than max_reply_size (%d bytes), a malformed message, or the '
                                   'server closed the connection)' % self.check.max_reply_size)
        elif final or now >= self.deadline:
            self.on_timeout()

    def on_timeout(self):
        waited = self.deadline - self.t0
        if self.cut_short:
            within = 'before the overall deadline (this attempt started late and had only %.3gs)' % waited
        else:
            within = 'within %gs' % self.check.timeout
        if self.handshake_ok:
            msg = 'connected, but no reply %s' % within
        elif self.connected:
            msg = 'TCP connected, but the ZMTP%s handshake did not complete %s' % (
                '/CURVE' if self.curve else '', within)
        elif self.socket_failed:
            msg = ('no TCP connection %s: this host could not open a TCP socket (out of descriptors, or no IPv6?)'
                   % within)
        else:
            msg = 'no TCP connection %s' % within
        self.finish(TIMEOUT, msg)

    def release(self):
        """Disconnect from the endpoint; the slot is free for the next check."""
        if self.slot is not None:
            self.slot.disconnect()

    def result(self, attempts):
        return dict(name=self.target.name, url=self.target.url, state=self.state, healthy=self.passes(),
                    latency_ms=self.latency_ms, reply=self.reply, reply_truncated=self.truncated,
                    message=self.message, attempts=attempts)


def _plain_result(target, state, message, attempts):
    return dict(name=target.name, url=target.url, state=state, healthy=False, latency_ms=None, reply=None,
                reply_truncated=False, message=message, attempts=attempts)


class HealthCheck(object):
    """Checks all targets with as many probes in flight as the descriptor budget allows.

    Every call ends by ``hard_deadline`` = start + wait_timeout + timeout: a probe never waits past
    it, nothing new starts after it, and whatever is left is reported as ``timeout``.
    """

    def __init__(self, targets, keys, timeout, wait_timeout=0.0, allow_degraded=False,
                 max_reply_size=DEFAULT_MAX_REPLY_SIZE, retry_interval=RETRY_INTERVAL, resolver=None):
        self.targets = targets
        self.keys = keys
        self.timeout = timeout
        self.wait_timeout = max(0.0, wait_timeout)
        self.allow_degraded = allow_degraded
        self.max_reply_size = max_reply_size
        self.max_frame_size = max_reply_size + (CURVE_FRAME_OVERHEAD if keys is not None else 0)
        self.retry_interval = retry_interval
        self.resolver = resolver or Resolver()
        self.monitor_events = _monitor_events()
        self.finished = []
        self.results = [None] * len(targets)
        self.attempts = [0] * len(targets)
        self.concurrency = 0
        self.budget = None
        self._deadlines = []  # heap of (time, seq, probe)
        self.awaiting = set()  # probes past the handshake, waiting for their reply
        self.max_wire_bytes = 2 * max_reply_size + 65536
        self.reply_cache = {}  # (expect text, reply bytes) -> evaluate_reply() verdict
        self._seq = 0

    def push_deadline(self, probe, when):
        self._seq += 1
        heapq.heappush(self._deadlines, (when, self._seq, probe))

    # -- main loop ------------------------------------------------------------------------
    def run(self):
        start = time.monotonic()
        self.wait_deadline = start + self.wait_timeout
        self.hard_deadline = start + self.wait_timeout + self.timeout
        self.budget = budget = FdBudget(len(self.targets))
        first = collections.deque()   # targets whose first attempt has not started
        retry = collections.deque()   # targets due for another attempt
        retry_at = []                 # heap of (time, index, target)
        dns_wait = {}                 # host -> [(target, is_retry)]
        addresses = {}                # host -> (address, ipv6)
        by_fd = {}                    # fd -> (slot, is_monitor)
        slots = []                    # every slot (REQ socket + monitor) made so far
        idle = collections.deque()    # slots without a check
        released = {}                 # endpoint address -> [(slot, time)] of its last checks
        inflight = 0
        backoff_until = 0.0
        next_size_check = start + SIZE_CHECK_INTERVAL
        ctx = None
        poller = None

        def enqueue(target, is_retry):
            if target.host_kind == 'name' and target.host not in addresses:
                dns_wait.setdefault(target.host, []).append((target, is_retry))
                self.resolver.request(target.host)
            else:
                (retry if is_retry else first).append(target)

        def unconnected():
            return sum(1 for slot in slots if slot.probe is not None and not slot.probe.connected)

        def fd_floor():
            return budget.base + (FDS_PER_PROBE - 1) * len(slots) + inflight

        def idle_slot(connect_url, now):
            """An idle slot that did not check CONNECT_URL lately, or None: make a new one.

            Monitor events of a connection can still arrive briefly after the disconnect, and they
            carry only the endpoint address: a slot is not used for the same address again within
            STALE_EVENTS_WINDOW. If every idle slot did, one of them is replaced by a new one.
            """
            recent = released.get(connect_url)
            avoid = ()
            if recent is not None:
                avoid = [slot for slot, when in recent if now - when < STALE_EVENTS_WINDOW]
                if not avoid:
                    del released[connect_url]
            if not idle:
                return None
            if not avoid:
                return idle.popleft()
            for _ in range(min(len(idle), 8)):
                slot = idle.popleft()
                if slot not in avoid:
                    return slot
                idle.append(slot)
            if len(slots) < budget.cap:
                return None
            retire(idle.popleft())
            return None

        def retire(slot):
            slots.remove(slot)
            for fd in slot.fds:
                by_fd.pop(fd, None)
                poller.unregister(fd)
            slot.close()

        try:
            ctx = zmq.Context(io_threads=IO_THREADS)
            # The context's own socket limit (default 1023): zmq_ctx_set, before the first socket.
            # Three sockets per slot (the REQ socket, the monitor's two PAIR sockets).
            limit = 3 * budget.cap + 64
            try:
                limit = min(limit, ctx.get(zmq.SOCKET_LIMIT))
            except zmq.ZMQError:
                pass
            ctx.set(zmq.MAX_SOCKETS, max(1024, limit))
            poller = FdPoller()
            for target in self.targets:
                enqueue(target, False)

            while True:
                now = time.monotonic()
                if now >= self.hard_deadline:
                    break

                # name look-ups that finished
                for host in [h for h in dns_wait if self.resolver.result(h) is not None]:
                    address, ipv6, error = self.resolver.result(host)
                    waiting = dns_wait.pop(host)
                    if address is not None:
                        addresses[host] = (address, ipv6)
                        for target, is_retry in waiting:
                            (retry if is_retry else first).append(target)
                        continue
                    self.resolver.forget(host)  # look it up again on the next attempt
                    for target, _is_retry in waiting:
                        self.attempts[target.index] += 1
                        self.results[target.index] = _plain_result(
                            target, REFUSED, 'cannot resolve host name %s: %s' % (short(target.host, 80), error),
                            self.attempts[target.index])
                        self._schedule_retry(target, now, retry_at)

                while retry_at and retry_at[0][0] <= now:
                    enqueue(heapq.heappop(retry_at)[2], True)

                # start probes, first attempts before retries, within the descriptor budget
                queued = len(first) + len(retry)
                free = budget.cap - inflight
                if queued and free > 0 and now >= backoff_until and (
                        inflight == 0 or free >= budget.refill or free >= queued):
                    budget.new_round()
                    while free > 0 and (first or retry):
                        is_retry = not first
                        target = first.popleft() if first else retry.popleft()
                        if is_retry and now >= self.wait_deadline:
                            continue  # too late for another attempt; the last result stands
                        host = addresses.get(target.host)
                        if target.host_kind == 'name':
                            connect_url = ('tcp://[%s]:%d' if host[1] else 'tcp://%s:%d') % (host[0], target.port)
                            ipv6 = host[1]
                        else:
                            connect_url, ipv6 = target.url, target.host_kind == 'ipv6'
                        slot = idle_slot(connect_url, now)
                        # A new slot takes its three sockets' descriptors and the connection's, a reused one
                        # only the connection's.
                        if not budget.reserve(FDS_PER_PROBE if slot is None else 1, unconnected, fd_floor):
                            if slot is not None:
                                idle.appendleft(slot)
                            (retry if is_retry else first).appendleft(target)
                            backoff_until = now + 0.005
                            break
                        probe = Probe(target, self)
                        try:
                            if slot is None:
                                self._seq += 1
                                slot = Slot(ctx, self, self._seq)
                                slots.append(slot)
                                for fd, is_monitor in zip(slot.fds, (False, True)):
                                    by_fd[fd] = (slot, is_monitor)
                                    poller.register(fd)
                            probe.start(slot, connect_url, ipv6)
                        except Exception as e:
                            if slot is not None:
                                idle.append(slot)
                            if isinstance(e, zmq.ZMQError) and e.errno in RESOURCE_ERRNOS:
                                # Out of descriptors or sockets: try again when probes have finished.
                                (retry if is_retry else first).appendleft(target)
                                backoff_until = time.monotonic() + 0.005
                                break
                            self.attempts[target.index] += 1
                            self.results[target.index] = _plain_result(
                                target, REFUSED, 'cannot connect: %s' % short(str(e)), self.attempts[target.index])
                            self._schedule_retry(target, now, retry_at)
                            continue
                        free -= 1
                        self.attempts[target.index] += 1
                        inflight += 1
                        self.concurrency = max(self.concurrency, inflight)
                        self.push_deadline(probe, probe.deadline)
                        # Arm both sockets: ZMQ_FD only signals new activity after ZMQ_EVENTS was read.
                        self._safely(probe, probe.on_monitor)
                        if not probe.done:
                            self._safely(probe, probe.on_sock_ready)

                if not (inflight or first or retry or retry_at or dns_wait or self.finished):
                    break

                # wait for activity, the next deadline or the next retry
                wake = self.hard_deadline
                if self._deadlines:
                    wake = min(wake, self._deadlines[0][0])
                if retry_at:
                    wake = min(wake, retry_at[0][0])
                if (first or retry) and backoff_until > now:
                    wake = min(wake, backoff_until)
                if dns_wait:
                    wake = min(wake, now + 0.01)
                if self.awaiting:
                    wake = min(wake, next_size_check)
                if self.finished:
                    wake = now
                timeout = max(0.0, wake - time.monotonic())
                if slots:
                    for fd, _ev in poller.poll(timeout):
                        entry = by_fd.get(fd)
                        if entry is None:
                            continue
                        slot, is_monitor = entry
                        probe = slot.probe
                        if probe is None or probe.done:
                            self._drain(slot, is_monitor)
                        else:
                            self._safely(probe, probe.on_monitor if is_monitor else probe.on_sock_ready)
                elif timeout > 0:
                    time.sleep(timeout)

                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _when, _seq, probe = heapq.heappop(self._deadlines)
                    self._safely(probe, lambda p=probe: p.on_deadline(now))

                if self.awaiting and now >= next_size_check:
                    next_size_check = now + SIZE_CHECK_INTERVAL
                    for probe in [p for p in self.awaiting if not p.done]:
                        self._safely(probe, probe.check_wire_size)

                for probe in self.finished:
                    self.awaiting.discard(probe)
                    probe.release()
                    idle.append(probe.slot)
                    url = probe.slot.last_url
                    if url in released:
                        released[url].append((probe.slot, now))
                    else:
                        released[url] = [(probe.slot, now)]
                    inflight -= 1
                    index = probe.target.index
                    self.results[index] = probe.result(self.attempts[index])
                    if not probe.passes():
                        self._schedule_retry(probe.target, now, retry_at)
                self.finished = []

            # The deadline passed (or all is done): whatever is left becomes 'timeout'.
            now = time.monotonic()
            for slot in slots:
                probe = slot.probe
                if probe is not None and not probe.done:
                    self._safely(probe, lambda p=probe: p.on_deadline(now, final=True))
            for probe in self.finished:
                probe.release()
                index = probe.target.index
                self.results[index] = probe.result(self.attempts[index])
            self.finished = []
            for target in list(first) + list(retry) + [t for w in dns_wait.values() for t, _r in w]:
                if self.results[target.index] is not None:
                    continue  # a retry that did not start: the last attempt's result stands
                if target.host_kind == 'name' and target.host not in addresses:
                    message = ('not checked: host name %s was not resolved before the overall deadline (%gs)'
                               % (short(target.host, 80), self.wait_timeout + self.timeout))
                else:
                    message = ('not checked: no free slot before the overall deadline (%gs); %s'
                               % (self.wait_timeout + self.timeout, budget.describe()))
                self.results[target.index] = _plain_result(target, TIMEOUT, message, self.attempts[target.index])
        finally:
            for slot in slots:
                slot.close()
            if poller is not None:
                poller.close()
            if ctx is not None:
                ctx.destroy(linger=0)
            budget.restore()
            self.resolver.stop()
        return self.results

    @staticmethod
    def _drain(slot, is_monitor):
        try:
            slot.drain(is_monitor)
        except Exception:
            pass

    def _schedule_retry(self, target, now, retry_at):
        if self.wait_timeout > 0 and now < self.wait_deadline:
            heapq.heappush(retry_at, (min(now + self.retry_interval, self.wait_deadline), target.index, target))

    @staticmethod
    def _safely(probe, handler):
        """Run a probe's handler; anything it raises ends that probe only."""
        try:
            handler()
        except Exception as e:
            if not probe.done:
                if probe.t0 is None:
                    probe.t0 = time.monotonic()
                probe.finish(BAD_REPLY, 'error while handling the reply: %s: %s' % (type(e).__name__, short(str(e))))


def check_endpoints(targets, keys, timeout, wait_timeout=0.0, allow_degraded=False,
                    max_reply_size=DEFAULT_MAX_REPLY_SIZE, retry_interval=RETRY_INTERVAL):
    """Check all targets; return (result dicts in input order, max attempts, most probes at once)."""
    check = HealthCheck(targets, keys, timeout, wait_timeout, allow_degraded, max_reply_size, retry_interval)
    results = check.run()
    return results, max(check.attempts) if check.attempts else 0, check.concurrency


# ------------------------------------------------------------------------------------ options
def _encode_request(request):
    if isinstance(request, bytes):
        return request
    if isinstance(request, str):
        return request.encode('utf-8')
    return json.dumps(request, allow_nan=False).encode('utf-8')


def parse_url(url, where):
    """Return (host, port, host_kind) of a tcp://HOST:PORT url, or raise ConfigError."""
    match = URL_RE.match(url)
    if not match:
        raise ConfigError('%s: url %r must look like tcp://HOST:PORT (IPv6 as tcp://[ADDRESS]:PORT)' % (where, url))
    port = int(match.group('port'))
    if not 1 <= port <= 65535:
        raise ConfigError('%s: url %r has port %d outside 1..65535' % (where, url, port))
    host = match.group('host')
    try:
        kind = check_host(host)
    except ValueError as e:
        raise ConfigError('%s: url %r has an invalid host: %s' % (where, url, e))
    return host, port, kind


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
        except Exception as e:  # the parser is not meant to raise anything else, but stay an argument error
            raise ConfigError('%s: invalid JMESPath expression %r: %s: %s' % (where, text, type(e).__name__, e))
        expect_cache[text] = compiled
        return compiled

    default_expect_text = params['expect'] if params['expect'] is not None else DEFAULT_EXPECT
    compile_expect(default_expect_text, 'option expect')
    default_request = params['request'] if params['request'] is not None else DEFAULT_REQUEST
    default_bytes = None

    targets = []
    for index, ep in enumerate(endpoints):
        where = 'endpoint %r' % ep['name']
        if not ep['name']:
            raise ConfigError('endpoint #%d: name must not be empty' % (index + 1))
        url = (ep['url'] or '').strip()
        host, port, kind = parse_url(url, where)
        expect_text = ep.get('expect') if ep.get('expect') is not None else default_expect_text
        expect = compile_expect(expect_text, '%s, option expect' % where)
        request = ep.get('request')
        if request is None:
            if default_bytes is None:
                try:
                    default_bytes = _encode_request(default_request)
                except (TypeError, ValueError) as e:
                    raise ConfigError('%s: request cannot be encoded: %s' % (where, e))
            request_bytes = default_bytes  # encoded once for all endpoints without their own request
        else:
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
        targets.append(Target(index, ep['name'], url, host, port, kind, request_bytes, expect_text, expect,
                              server_key))
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


def check_numbers(params):
    """Validate the numeric options; raise ConfigError."""
    timeout = params['timeout']
    if not (0.0 < timeout <= MAX_TIMEOUT):  # also false for NaN
        raise ConfigError('timeout must be a finite number of seconds greater than 0 and at most %g (got %s)'
                          % (MAX_TIMEOUT, timeout))
    wait_timeout = params['wait_timeout']
    if not (0.0 <= wait_timeout <= MAX_TIMEOUT):
        raise ConfigError('wait_timeout must be a finite number of seconds from 0 to %g (got %s)'
                          % (MAX_TIMEOUT, wait_timeout))
    size = params['max_reply_size']
    if not (1 <= size <= MAX_MAX_REPLY_SIZE):
        raise ConfigError('max_reply_size must be from 1 to %d bytes (got %s)' % (MAX_MAX_REPLY_SIZE, size))


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
            max_reply_size=dict(type='int', default=DEFAULT_MAX_REPLY_SIZE),
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
    try:
        check_numbers(p)
        targets = build_targets(p)
        keys = build_keys(p, targets)
    except (ConfigError, CurveKeyError) as e:
        module.fail_json(msg=str(e))
    if keys is not None:
        # Belt and braces: make Ansible mask the secret anywhere in the output.
        module.no_log_values.add(keys.secret_key.decode('ascii'))

    try:
        results, attempts, concurrency = check_endpoints(
            targets, keys, p['timeout'], p['wait_timeout'], p['allow_degraded'], p['max_reply_size'])
    except zmq.ZMQError as e:
        # Only the context itself can fail here (for example no descriptor left for its threads).
        module.fail_json(msg='ZeroMQ error while checking endpoints: %s' % e)

    healthy_count = sum(1 for r in results if r['healthy'])
    unhealthy_count = len(results) - healthy_count
    out = dict(
        changed=False,
        endpoints=results,
        healthy_count=healthy_count,
        unhealthy_count=unhealthy_count,
        attempts=attempts,
        concurrency=concurrency,
        msg=summarize(results),
        elapsed_ms=round((time.monotonic() - started) * 1000.0, 1),
    )
    if unhealthy_count and p['fail_on_unhealthy']:
        module.fail_json(**out)
    module.exit_json(**out)


if __name__ == '__main__':
    main()
