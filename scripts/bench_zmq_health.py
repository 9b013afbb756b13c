#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Benchmark: one batched zmq_health call versus one zmq_health call per endpoint.

Starts AGENTS healthy CurveZMQ agents (real REP sockets in one server thread: one zmq.Context,
one ThreadAuthenticator configured with configure_curve(domain='*', location=certdir)) on
127.0.0.1, plus DEAD ports where nothing listens, then runs through real Ansible:

  1. batched: one zmq_health task over all endpoints (generated playbook);
  2. loop:    the same checks as one zmq_health task per endpoint (``loop:``).

Both playbooks have the same shape (set_fact t0, the check, set_fact t1, write results), so
their wall times are comparable. Printed: wall time of each ansible-playbook run, the time of
the check task itself, the time spent inside the module (its ``elapsed_ms`` return value,
summed over the loop) and the loop/batched ratios.

Goals: batched inside-module time <= 0.5 s; loop/batched wall-time ratio >= 30x.
A missed goal prints MISSED; the exit status is non-zero only on errors (Ansible failed,
unexpected endpoint states, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

try:
    import zmq
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator
except ImportError:
    sys.exit('error: pyzmq is not importable by %s; run this script with the Python of the venv that has '
             'ansible-core and pyzmq, e.g. /path/to/venv/bin/python %s' % (sys.executable, sys.argv[0]))

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
GOAL_INSIDE_S = 0.5
GOAL_RATIO = 30.0


class AgentFarm(object):
    """N CURVE REP sockets on 127.0.0.1 served by one thread with one context and authenticator."""

    def __init__(self, count, certdir):
        self.count = count
        self.certdir = certdir
        self.ports = []
        self.requests = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error = None
        self.ctx = zmq.Context()
        self.auth = ThreadAuthenticator(self.ctx)
        self.thread = threading.Thread(target=self._serve, name='agent-farm', daemon=True)

    def start(self):
        self.auth.start()
        self.auth.configure_curve(domain='*', location=self.certdir)
        self.thread.start()
        if not self._ready.wait(30) or self._error:
            raise RuntimeError('agent farm failed to start: %s' % self._error)
        return self

    def _serve(self):
        public, secret = zmq.auth.load_certificate(os.path.join(self.certdir, 'server.key_secret'))
        socks = []
        poller = zmq.Poller()
        try:
            for _ in range(self.count):
                s = self.ctx.socket(zmq.REP)
                s.linger = 0
                s.curve_publickey, s.curve_secretkey, s.curve_server = public, secret, True
                self.ports.append(s.bind_to_random_port('tcp://127.0.0.1'))
                poller.register(s, zmq.POLLIN)
                socks.append(s)
        except Exception as e:  # pragma: no cover
            self._error = e
        self._ready.set()
        reply = json.dumps({'status': 'ok', 'ready': True, 'initialized': True,
                            'health_status': 'healthy'}).encode()
        try:
            while not self._stop.is_set() and not self._error:
                for s, _ev in poller.poll(100):
                    s.recv()
                    s.send(reply)
                    self.requests += 1
        finally:
            for s in socks:
                s.close(0)

    def stop(self):
        self._stop.set()
        self.thread.join(10)
        self.auth.stop()
        self.ctx.term()


def free_ports(count, exclude):
    ports = []
    holders = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(('127.0.0.1', 0))
            holders.append(s)
            port = s.getsockname()[1]
            if port not in exclude:
                ports.append(port)
    finally:
        for s in holders:
            s.close()
    return ports


def write_playbook(path, loop):
    check = [
        "    - name: zmq_health check",
        "      zmq_health:",
        "        certificates_dir: \"{{ bench_certdir }}\"",
        "        timeout: \"{{ bench_timeout }}\"",
        "        fail_on_unhealthy: false",
    ]
    if loop:
        check += [
            "        endpoints: [\"{{ item }}\"]",
            "      loop: \"{{ bench_endpoints }}\"",
            "      loop_control: {label: \"{{ item.name }}\"}",
        ]
        results = "{{ check.results | map(attribute='endpoints') | flatten }}"
        inside = "{{ check.results | map(attribute='elapsed_ms') | sum }}"
    else:
        check += ["        endpoints: \"{{ bench_endpoints }}\""]
        results = "{{ check.endpoints }}"
        inside = "{{ check.elapsed_ms }}"
    lines = [
        "- hosts: localhost",
        "  gather_facts: false",
        "  connection: local",
        "  tasks:",
        "    - ansible.builtin.set_fact: {bench_t0: \"{{ now(utc=true).timestamp() }}\"}",
    ] + check + [
        "      register: check",
        "    - ansible.builtin.set_fact: {bench_t1: \"{{ now(utc=true).timestamp() }}\"}",
        "    - ansible.builtin.copy:",
        "        dest: \"{{ bench_out }}\"",
        "        content: \"{{ {'task_s': (bench_t1 | float) - (bench_t0 | float),"
        " 'inside_ms': (%s | float), 'endpoints': (%s)} | to_json }}\""
        % (inside.strip('{} '), results.strip('{} ')),
    ]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def run_playbook(playbook_bin, playbook, extra_vars_file, python, env, cwd, out_file):
    cmd = [playbook_bin, '-i', 'localhost,', playbook, '-e', '@%s' % extra_vars_file,
           '-e', 'ansible_python_interpreter=%s' % python, '-e', 'bench_out=%s' % out_file]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError('%s failed (rc=%d):\n%s\n%s' % (' '.join(cmd), proc.returncode,
                                                          proc.stdout[-4000:], proc.stderr[-4000:]))
    with open(out_file) as f:
        data = json.load(f)
    data['wall_s'] = wall
    return data


def check_states(label, endpoints, agents, dead):
    states = {}
    for e in endpoints:
        states[e['state']] = states.get(e['state'], 0) + 1
    expected = {'healthy': agents, 'refused': dead} if dead else {'healthy': agents}
    if states != expected:
        bad = [e for e in endpoints if not (e['state'] == 'healthy' or (e['state'] == 'refused'
                                                                          and e['name'].startswith('dead')))]
        raise RuntimeError('%s: unexpected endpoint states %r (expected %r); first bad: %r'
                           % (label, states, expected, bad[:3]))
    return states


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--agents', type=int, default=70, help='healthy CURVE agents (default 70)')
    ap.add_argument('--dead', type=int, default=10, help='ports with nothing listening (default 10)')
    ap.add_argument('--timeout', type=float, default=2.0, help='zmq_health timeout (default 2)')
    ap.add_argument('--python', default=sys.executable,
                    help='ansible_python_interpreter for the module (default: this interpreter)')
    ap.add_argument('--bin-dir', default=os.path.dirname(sys.executable),
                    help='directory holding ansible-playbook (default: next to this interpreter)')
    ap.add_argument('--repo', default=REPO_ROOT, help='repository with library/ and module_utils/')
    ap.add_argument('--keep', action='store_true', help='keep the temporary work directory')
    args = ap.parse_args()

    playbook_bin = os.path.join(args.bin_dir, 'ansible-playbook')
    if not os.path.exists(playbook_bin):
        playbook_bin = shutil.which('ansible-playbook')
    if not playbook_bin:
        print('error: ansible-playbook not found next to %s or on PATH' % sys.executable, file=sys.stderr)
        return 2

    work = tempfile.mkdtemp(prefix='bench-zmq-health-')
    farm = None
    try:
        certdir = os.path.join(work, 'certificates')
        os.mkdir(certdir, 0o700)
        zmq.auth.create_certificates(certdir, 'server')
        zmq.auth.create_certificates(certdir, 'client')

        farm = AgentFarm(args.agents, certdir).start()
        dead_ports = free_ports(args.dead, set(farm.ports))
        endpoints = [dict(name='agent-%02d' % i, url='tcp://127.0.0.1:%d' % p) for i, p in enumerate(farm.ports)]
        endpoints += [dict(name='dead-%02d' % i, url='tcp://127.0.0.1:%d' % p) for i, p in enumerate(dead_ports)]
        n = len(endpoints)

        cfg = os.path.join(work, 'ansible.cfg')
        with open(cfg, 'w') as f:
            f.write('[defaults]\nlibrary = %s\nmodule_utils = %s\nhost_key_checking = False\n'
                    'retry_files_enabled = False\nlocalhost_warning = False\n'
                    % (os.path.join(args.repo, 'library'), os.path.join(args.repo, 'module_utils')))
        env = dict(os.environ, ANSIBLE_CONFIG=cfg, ANSIBLE_NOCOLOR='1',
                   ANSIBLE_LOCAL_TEMP=os.path.join(work, 'tmp'), ANSIBLE_REMOTE_TEMP=os.path.join(work, 'rtmp'),
                   ANSIBLE_INVENTORY_UNPARSED_WARNING='False')
        vars_file = os.path.join(work, 'vars.json')
        with open(vars_file, 'w') as f:
            json.dump(dict(bench_endpoints=endpoints, bench_certdir=certdir, bench_timeout=args.timeout), f)
        batched_pb = os.path.join(work, 'batched.yml')
        loop_pb = os.path.join(work, 'loop.yml')
        write_playbook(batched_pb, loop=False)
        write_playbook(loop_pb, loop=True)

        print('%d healthy CURVE agents + %d dead ports on 127.0.0.1, timeout %gs, interpreter %s'
              % (args.agents, args.dead, args.timeout, args.python))
        print('running 1 zmq_health task over %d endpoints ...' % n, flush=True)
        batched = run_playbook(playbook_bin, batched_pb, vars_file, args.python, env, work,
                               os.path.join(work, 'batched.json'))
        states = check_states('batched', batched['endpoints'], args.agents, args.dead)
        print('  states: %s' % ', '.join('%s=%d' % kv for kv in sorted(states.items())))
        print('running %d zmq_health tasks (loop:) ...' % n, flush=True)
        looped = run_playbook(playbook_bin, loop_pb, vars_file, args.python, env, work,
                              os.path.join(work, 'loop.json'))
        states = check_states('loop', looped['endpoints'], args.agents, args.dead)
        print('  states: %s' % ', '.join('%s=%d' % kv for kv in sorted(states.items())))

        refused_ms = [e['latency_ms'] for e in batched['endpoints'] if e['state'] == 'refused']
        healthy_ms = [e['latency_ms'] for e in batched['endpoints'] if e['state'] == 'healthy']
        b_inside = batched['inside_ms'] / 1000.0
        l_inside = looped['inside_ms'] / 1000.0
        wall_ratio = looped['wall_s'] / batched['wall_s']
        task_ratio = looped['task_s'] / batched['task_s'] if batched['task_s'] > 0 else float('inf')

        print()
        print('%-34s %12s %12s %16s' % ('mode', 'wall (s)', 'task (s)', 'inside module (s)'))
        print('%-34s %12.2f %12.2f %16.3f' % ('batched: 1 call, %d endpoints' % n,
                                              batched['wall_s'], batched['task_s'], b_inside))
        print('%-34s %12.2f %12.2f %16.3f' % ('loop: %d calls, 1 endpoint each' % n,
                                              looped['wall_s'], looped['task_s'], l_inside))
        print('%-34s %11.1fx %11.1fx %15.1fx' % ('ratio loop / batched', wall_ratio, task_ratio,
                                                 l_inside / b_inside if b_inside else float('inf')))
        print()
        print('batched per-endpoint latency: healthy max %.1f ms, refused max %.1f ms'
              % (max(healthy_ms or [0]), max(refused_ms or [0])))
        print('goal: batched inside-module <= %.1f s: %.3f s  %s'
              % (GOAL_INSIDE_S, b_inside, 'OK' if b_inside <= GOAL_INSIDE_S else 'MISSED'))
        print('goal: loop/batched wall ratio >= %.0fx: %.1fx  %s'
              % (GOAL_RATIO, wall_ratio, 'OK' if wall_ratio >= GOAL_RATIO else 'MISSED'))
        print('      (check-task time ratio, without ansible-playbook start-up: %.1fx  %s)'
              % (task_ratio, 'OK' if task_ratio >= GOAL_RATIO else 'MISSED'))
        return 0
    except Exception as e:
        print('error: %s' % e, file=sys.stderr)
        return 1
    finally:
        if farm is not None:
            farm.stop()
        if args.keep:
            print('work directory kept: %s' % work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
