# -*- coding: utf-8 -*-
"""Generic helpers for the unit tests of this repository's Ansible modules.

* makes ``ansible.module_utils.<name>`` importable for every file in ``module_utils/``
  (as ``ansible.cfg``'s ``module_utils = ./module_utils`` does for real runs);
* ``load_library_module(name)`` imports ``library/<name>.py`` as a Python module;
* ``run_module(module, args, check_mode=False, diff=False)`` runs its ``main()`` with
  ansible-core's real ``AnsibleModule`` and returns the parsed JSON result;
* ``RepServer`` / ``rep_server`` fixture: real pyzmq REP servers on 127.0.0.1 in threads,
  optionally CURVE with a real ``ThreadAuthenticator``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import json
import os
import socket
import sys
import threading

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
LIBRARY_DIR = os.path.join(REPO_ROOT, 'library')
MODULE_UTILS_DIR = os.path.join(REPO_ROOT, 'module_utils')


def load_source(module_name, path):
    """Import the Python file PATH under MODULE_NAME (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def register_module_utils():
    """Register every module_utils/*.py as ansible.module_utils.<name>."""
    import ansible.module_utils as amu
    for path in sorted(glob.glob(os.path.join(MODULE_UTILS_DIR, '*.py'))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name == '__init__':
            continue
        full = 'ansible.module_utils.%s' % name
        if full not in sys.modules:
            setattr(amu, name, load_source(full, path))


register_module_utils()

_LIBRARY_CACHE = {}


def load_library_module(name):
    """Import library/NAME.py (cached) and return the Python module."""
    if name not in _LIBRARY_CACHE:
        _LIBRARY_CACHE[name] = load_source('_library_%s' % name, os.path.join(LIBRARY_DIR, name + '.py'))
    return _LIBRARY_CACHE[name]


def run_module(module, args, check_mode=False, diff=False):
    """Run MODULE.main() in-process with ARGS via the real AnsibleModule; return the result dict."""
    from ansible.module_utils.testing import patch_module_args

    args = dict(args)
    if check_mode:
        args['_ansible_check_mode'] = True
    if diff:
        args['_ansible_diff'] = True
    out = io.StringIO()
    with patch_module_args(args), contextlib.redirect_stdout(out):
        try:
            module.main()
        except SystemExit:
            pass
        else:  # pragma: no cover
            raise AssertionError('module did not exit')
    text = out.getvalue()
    try:
        return json.loads(text)
    except ValueError:  # pragma: no cover - shows what the module printed
        raise AssertionError('module printed no JSON result: %r' % text)


def free_tcp_port():
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class RepServer(object):
    """A real pyzmq REP server on 127.0.0.1, served by a thread.

    ``handler(request_bytes)`` returns the reply: bytes/str are sent as-is, anything else as JSON,
    ``None`` means "never reply" (a silent server). ``curve_keys`` is ``(public, secret)`` of the
    server; ``auth_location`` enables a ThreadAuthenticator with
    ``configure_curve(domain='*', location=auth_location)`` on the server's context.
    """

    def __init__(self, handler, curve_keys=None, auth_location=None, port=None):
        self.handler = handler
        self.curve_keys = curve_keys
        self.auth_location = auth_location
        self.port = port
        self.received = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error = None
        self.ctx = None
        self.auth = None
        self.thread = None

    @property
    def url(self):
        return 'tcp://127.0.0.1:%d' % self.port

    def start(self):
        import zmq
        self.ctx = zmq.Context()
        if self.auth_location is not None:
            from zmq.auth.thread import ThreadAuthenticator
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain='*', location=self.auth_location)
        self.thread = threading.Thread(target=self._serve, name='rep-server', daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError('REP server did not start')
        if self._error:
            raise RuntimeError('REP server failed: %s' % self._error)
        return self

    def _serve(self):
        import zmq
        sock = self.ctx.socket(zmq.REP)
        sock.linger = 0
        try:
            if self.curve_keys:
                sock.curve_publickey, sock.curve_secretkey = self.curve_keys
                sock.curve_server = True
            if self.port:
                sock.bind('tcp://127.0.0.1:%d' % self.port)
            else:
                self.port = sock.bind_to_random_port('tcp://127.0.0.1')
        except Exception as e:
            self._error = e
            sock.close(0)
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                msg = sock.recv()
                self.received.append(msg)
                reply = self.handler(msg)
                if reply is None:
                    continue  # silent: never answer (REP then cannot receive again; fine for tests)
                if isinstance(reply, str):
                    reply = reply.encode('utf-8')
                elif not isinstance(reply, bytes):
                    reply = json.dumps(reply).encode('utf-8')
                sock.send(reply)
        finally:
            sock.close(0)

    def stop(self):
        self._stop.set()
        if self.thread is not None:
            self.thread.join(10)
        if self.auth is not None:
            self.auth.stop()
        if self.ctx is not None:
            self.ctx.term()


@pytest.fixture
def rep_server():
    """Factory fixture: ``rep_server(handler, curve_keys=..., auth_location=..., port=...)``.

    Every server is stopped at teardown. ``start=False`` returns an unstarted server.
    """
    servers = []

    def factory(handler, curve_keys=None, auth_location=None, port=None, start=True):
        server = RepServer(handler, curve_keys=curve_keys, auth_location=auth_location, port=port)
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def module_runner():
    """``module_runner(name, args, check_mode=False, diff=False)`` -> result dict."""
    def runner(name, args, check_mode=False, diff=False):
        return run_module(load_library_module(name), args, check_mode=check_mode, diff=diff)
    return runner
