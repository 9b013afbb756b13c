#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Benchmark of the zmq_health module, run through real Ansible (ansible-playbook).

Healthy CurveZMQ agents are real CURVE REP endpoints on 127.0.0.1 in several server processes
(one zmq.Context each, client keys checked over ZAP against the *.key files of the certificates
directory, as ThreadAuthenticator.configure_curve(domain='*', location=certdir) does); refused
endpoints are ports where nothing listens.
The module's ansible-playbook runs with RLIMIT_NOFILE = (--nofile, --nofile), by default 1024
for both the soft and the hard limit (`ulimit -n 1024`), so the module cannot raise it.

Scenarios:

  fan-out: one zmq_health task over 70 agents + 10 refused endpoints versus the same checks as
           80 tasks (``loop:``). Goals: batched time inside the module <= 0.5 s, loop/batched
           wall-time ratio >= 30x.
  scale:   one task over 1000 healthy agents, goal <= 1 s inside the module; one task over
           5000 endpoints (4500 healthy agents, 500 refused), goal <= 3 s inside the module.
           Every endpoint must be classified correctly (healthy or refused).

"Inside the module" is the module's own ``elapsed_ms``. The peak number of descriptors the
module process had open is sampled from /proc every few milliseconds (so it is a lower bound).
The scale runs also print the CPU seconds of the module process, of the agent processes and of the
whole machine (busy of available) while ansible-playbook ran: the agents share the module's cores,
and other load on the machine shows as the difference.
A missed goal prints MISSED; the exit status is non-zero only on errors (Ansible failed,
unexpected endpoint states, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
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
    import zmq.utils.z85
except ImportError:
    sys.exit('error: pyzmq is not importable by %s; run this script with the Python of the venv that has '
             'ansible-core and pyzmq, e.g. /path/to/venv/bin/python %s' % (sys.executable, sys.argv[0]))

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
GOAL_INSIDE_S = 0.5
GOAL_RATIO = 30.0
GOAL_1000_S = 1.0
GOAL_5000_S = 3.0
REPLY = json.dumps({'status': 'ok', 'ready': True, 'initialized': True, 'health_status': 'healthy'}).encode()


# ------------------------------------------------------------------------------------ agents
def serve_agents(count, certdir):
    """Child process: COUNT CURVE agents; prints their ports as one JSON line, serves until stdin closes.

    One REP socket bound to COUNT ports: on the wire every port is its own CURVE server (own
    listener, own connections, own handshakes), and serving them costs one recv/send instead of a
    zmq_poll over hundreds of sockets. Client keys are checked over ZAP like
    ThreadAuthenticator.configure_curve(domain='*', location=certdir) does (the *.key files of
    certdir are authorised), by a minimal handler in the serving thread: the agents' servers run on
    other hosts, so here they should cost the module's cores as little as possible.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    public, secret = zmq.auth.load_certificate(os.path.join(certdir, 'server.key_secret'))
    allowed = set(k if isinstance(k, bytes) else k.encode() for k in zmq.auth.load_certificates(certdir))
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)
    zap.linger = 0
    zap.bind('inproc://zeromq.zap.01')
    sock = ctx.socket(zmq.REP)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True
    ports = [sock.bind_to_random_port('tcp://127.0.0.1') for _ in range(count)]
    sys.stdout.write(json.dumps(ports) + '\n')
    sys.stdout.flush()
    stop = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(zap, zmq.POLLIN)
    while not stop.is_set():
        for s, _ev in poller.poll(100):
            if s is zap:
                # ZAP request: version, request id, domain, address, identity, mechanism, client key
                frames = zap.recv_multipart()
                ok = len(frames) >= 7 and frames[5] == b'CURVE' and zmq.utils.z85.encode(frames[6]) in allowed
                zap.send_multipart([b'1.0', frames[1] if len(frames) > 1 else b'', b'200' if ok else b'400',
                                    b'OK' if ok else b'client key not authorised', b'', b''])
            else:
                sock.recv()
                sock.send(REPLY)
    sock.close(0)
    zap.close(0)
    ctx.term()


class AgentFarm(object):
    """COUNT healthy CURVE agents in several processes (a listening descriptor per agent)."""

    def __init__(self, count, certdir):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hard = 65536 if hard == resource.RLIM_INFINITY else hard
        per_process = max(50, min(1500, hard - 400))
        processes = max(2 if count >= 200 else 1, int(math.ceil(count / float(per_process))))
        self.sizes = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
        self.certdir = certdir
        self.procs = []
        self.ports = []

    def start(self):
        for size in self.sizes:
            self.procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), '--serve-agents', str(size), self.certdir],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        per_process = []
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError('an agent process failed to start (exit code %s)' % proc.poll())
            per_process.append(json.loads(line))
        # Interleave the processes: endpoints next to each other (checked at the same time) are
        # served by different processes, as agents on different hosts would be.
        for i in range(max(len(p) for p in per_process)):
            self.ports.extend(p[i] for p in per_process if i < len(p))
        return self

    def stop(self):
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


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


# ------------------------------------------------------------------------------------ descriptors
def process_cpu(pid):
    """User + system CPU seconds of process PID (all its threads) so far."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf('SC_CLK_TCK'))


def machine_cpu():
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open('/proc/stat') as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    hz = float(os.sysconf('SC_CLK_TCK'))
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


class FdSampler(object):
    """Samples the number of open descriptors of the zmq_health module process (AnsiballZ)."""

    def __init__(self, interval=0.005):
        self.interval = interval
        self.peak = 0
        self.pid = None
        self.limit = None
        self.cpu = 0.0  # CPU seconds of the module process (all threads) at the last sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _find(self):
        for entry in os.listdir('/proc'):
            if not entry.isdigit():
                continue
            try:
                with open('/proc/%s/cmdline' % entry, 'rb') as f:
                    argv = f.read().split(b'\0')
            except OSError:
                continue
            # the Python process that runs the module, not the /bin/sh that starts it
            if b'python' in os.path.basename(argv[0]) and any(b'AnsiballZ_zmq_health' in a for a in argv):
                return int(entry)
        return None

    def _run(self):
        while not self._stop.wait(self.interval):
            if self.pid is None:
                self.pid = self._find()
                if self.pid is None:
                    continue
                try:
                    with open('/proc/%d/limits' % self.pid) as f:
                        for line in f:
                            if line.startswith('Max open files'):
                                self.limit = int(line.split()[3])
                except (OSError, ValueError, IndexError):
                    pass
            try:
                path = '/proc/%d/fd' % self.pid
                # Linux >= 6.2 reports the number of open descriptors as the directory's size (cheap);
                # listing about a thousand entries every few milliseconds would slow the module down.
                count = os.stat(path).st_size or len(os.listdir(path))
                self.peak = max(self.peak, count)
                self.cpu = process_cpu(self.pid)
            except (OSError, ValueError, IndexError):
                self.pid = None  # the module finished (or a new one will start: loop mode)


# ------------------------------------------------------------------------------------ playbooks
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
        concurrency = "{{ check.results | map(attribute='concurrency') | max }}"
    else:
        check += ["        endpoints: \"{{ bench_endpoints }}\""]
        results = "{{ check.endpoints }}"
        inside = "{{ check.elapsed_ms }}"
        concurrency = "{{ check.concurrency }}"
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
        " 'inside_ms': (%s | float), 'concurrency': (%s), 'endpoints': (%s)} | to_json }}\""
        % (inside.strip('{} '), concurrency.strip('{} '), results.strip('{} ')),
    ]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


class Runner(object):
    """Runs a generated playbook with ansible-playbook under RLIMIT_NOFILE (nofile, nofile)."""

    def __init__(self, playbook_bin, python, env, work, nofile, agent_pids=()):
        self.playbook_bin = playbook_bin
        self.python = python
        self.env = env
        self.work = work
        self.nofile = nofile
        self.agent_pids = list(agent_pids)
        self.batched = os.path.join(work, 'batched.yml')
        self.loop = os.path.join(work, 'loop.yml')
        write_playbook(self.batched, loop=False)
        write_playbook(self.loop, loop=True)
        self.runs = 0

    def _limit(self):
        if self.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def run(self, endpoints, certdir, timeout, loop=False):
        self.runs += 1
        vars_file = os.path.join(self.work, 'vars-%d.json' % self.runs)
        out_file = os.path.join(self.work, 'out-%d.json' % self.runs)
        with open(vars_file, 'w') as f:
            json.dump(dict(bench_endpoints=endpoints, bench_certdir=certdir, bench_timeout=timeout), f)
        cmd = [self.playbook_bin, '-i', 'localhost,', self.loop if loop else self.batched,
               '-e', '@%s' % vars_file, '-e', 'ansible_python_interpreter=%s' % self.python,
               '-e', 'bench_out=%s' % out_file]
        t0 = time.monotonic()
        agents0 = sum(process_cpu(pid) for pid in self.agent_pids)
        busy0, total0 = machine_cpu()
        with FdSampler() as sampler:
            proc = subprocess.run(cmd, cwd=self.work, env=self.env, capture_output=True, text=True,
                                  preexec_fn=self._limit)
        wall = time.monotonic() - t0
        busy1, total1 = machine_cpu()
        agents_cpu = sum(process_cpu(pid) for pid in self.agent_pids) - agents0
        if proc.returncode != 0:
            raise RuntimeError('%s failed (rc=%d):\n%s\n%s' % (' '.join(cmd), proc.returncode,
                                                              proc.stdout[-4000:], proc.stderr[-4000:]))
        with open(out_file) as f:
            data = json.load(f)
        data['wall_s'] = wall
        data['peak_fds'] = sampler.peak
        data['module_cpu_s'] = sampler.cpu
        data['agents_cpu_s'] = agents_cpu
        data['machine_busy_s'] = busy1 - busy0
        data['machine_total_s'] = total1 - total0
        data['fd_limit'] = sampler.limit
        return data


def check_states(label, endpoints, agents, dead):
    states = {}
    for e in endpoints:
        states[e['state']] = states.get(e['state'], 0) + 1
    wrong = [e for e in endpoints if e['state'] != ('refused' if e['name'].startswith('dead') else 'healthy')]
    if wrong:
        expected = {'healthy': agents, 'refused': dead} if dead else {'healthy': agents}
        raise RuntimeError('%s: unexpected endpoint states %r (expected %r); first wrong: %r'
                           % (label, states, expected, wrong[:3]))
    return states


def endpoint_list(agent_ports, dead_ports):
    endpoints = [dict(name='agent-%04d' % i, url='tcp://127.0.0.1:%d' % p) for i, p in enumerate(agent_ports)]
    endpoints += [dict(name='dead-%04d' % i, url='tcp://127.0.0.1:%d' % p) for i, p in enumerate(dead_ports)]
    return endpoints


def goal(text, value, limit):
    print('goal: %s <= %g s: %.3f s  %s' % (text, limit, value, 'OK' if value <= limit else 'MISSED'))


# ------------------------------------------------------------------------------------ scenarios
def fanout(runner, farm, dead_ports, certdir, args):
    agents, dead = args.fanout_agents, args.fanout_dead
    endpoints = endpoint_list(farm.ports[:agents], dead_ports[:dead])
    n = len(endpoints)
    print('fan-out: %d healthy CURVE agents + %d refused endpoints, timeout %gs' % (agents, dead, args.fanout_timeout))
    print('  running 1 zmq_health task over %d endpoints ...' % n, flush=True)
    batched = runner.run(endpoints, certdir, args.fanout_timeout)
    states = check_states('batched', batched['endpoints'], agents, dead)
    print('    states: %s' % ', '.join('%s=%d' % kv for kv in sorted(states.items())))
    print('  running %d zmq_health tasks (loop:) ...' % n, flush=True)
    looped = runner.run(endpoints, certdir, args.fanout_timeout, loop=True)
    states = check_states('loop', looped['endpoints'], agents, dead)
    print('    states: %s' % ', '.join('%s=%d' % kv for kv in sorted(states.items())))

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
    goal('batched inside-module', b_inside, GOAL_INSIDE_S)
    print('goal: loop/batched wall ratio >= %.0fx: %.1fx  %s'
          % (GOAL_RATIO, wall_ratio, 'OK' if wall_ratio >= GOAL_RATIO else 'MISSED'))
    print('      (check-task time ratio, without ansible-playbook start-up: %.1fx  %s)'
          % (task_ratio, 'OK' if task_ratio >= GOAL_RATIO else 'MISSED'))


def scale(runner, farm, dead_ports, certdir, args):
    print('scale: one zmq_health task, timeout %gs, module RLIMIT_NOFILE %s'
          % (args.scale_timeout, args.nofile or 'unchanged'))
    print('%-44s %9s %9s %12s %10s %10s' % ('endpoints', 'wall (s)', 'task (s)', 'inside (s)', 'parallel',
                                             'peak fds'))
    rows = []
    for agents, dead, limit in ((args.small_scale, 0, GOAL_1000_S), (args.agents, args.dead, GOAL_5000_S)):
        endpoints = endpoint_list(farm.ports[:agents], dead_ports[:dead])
        label = '%d (%d healthy CURVE, %d refused)' % (len(endpoints), agents, dead)
        data = runner.run(endpoints, certdir, args.scale_timeout)
        states = check_states(label, data['endpoints'], agents, dead)
        inside = data['inside_ms'] / 1000.0
        print('%-44s %9.2f %9.2f %12.3f %10d %6d/%s' % (label, data['wall_s'], data['task_s'], inside,
                                                        data['concurrency'], data['peak_fds'],
                                                        data['fd_limit'] or '?'), flush=True)
        rows.append((label, inside, limit, states, data))
    print()
    print('CPU seconds while ansible-playbook ran: the module process (sampled every 5 ms, with Ansible\'s start-up'
          ' and its libzmq threads), the agent processes, the whole machine (busy of available):')
    for label, inside, limit, states, data in rows:
        print('  %-42s module %.2f, agents %.2f, machine %.2f of %.2f'
              % (label, data['module_cpu_s'], data['agents_cpu_s'], data['machine_busy_s'], data['machine_total_s']))
    for label, inside, limit, states, data in rows:
        print('%s: %s' % (label, ', '.join('%s=%d' % kv for kv in sorted(states.items()))))
        goal('%s classified inside the module' % label, inside, limit)
    print('peak descriptors in use by the module process (sampled every 5 ms): %s'
          % ', '.join('%d of %s' % (d['peak_fds'], d['fd_limit'] or '?') for _l, _i, _g, _s, d in rows))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == '--serve-agents':
        serve_agents(int(sys.argv[2]), sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--agents', type=int, default=4500, help='healthy CURVE agents of the large scale run (4500)')
    ap.add_argument('--dead', type=int, default=500, help='refused endpoints of the large scale run (500)')
    ap.add_argument('--small-scale', type=int, default=1000, help='healthy agents of the small scale run (1000)')
    ap.add_argument('--scale-timeout', type=float, default=30.0,
                    help='zmq_health timeout in the scale runs (30: the deadline must not decide the states)')
    ap.add_argument('--fanout-agents', type=int, default=70, help='healthy agents of the fan-out run (70)')
    ap.add_argument('--fanout-dead', type=int, default=10, help='refused endpoints of the fan-out run (10)')
    ap.add_argument('--fanout-timeout', '--timeout', type=float, default=2.0,
                    help='zmq_health timeout in the fan-out runs (2)')
    ap.add_argument('--nofile', type=int, default=1024,
                    help='soft and hard RLIMIT_NOFILE for ansible-playbook and the module (1024; 0: unchanged)')
    ap.add_argument('--skip-fanout', action='store_true', help='only the scale runs')
    ap.add_argument('--skip-scale', action='store_true', help='only the fan-out runs')
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
    if args.nofile:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < args.nofile:
            print('note: --nofile %d is above the hard limit %d; the module runs with %d'
                  % (args.nofile, hard, hard))
            args.nofile = hard

    agents = max(args.fanout_agents if not args.skip_fanout else 0,
                 max(args.agents, args.small_scale) if not args.skip_scale else 0)
    dead = max(args.fanout_dead if not args.skip_fanout else 0, args.dead if not args.skip_scale else 0)
    work = tempfile.mkdtemp(prefix='bench-zmq-health-')
    farm = None
    try:
        certdir = os.path.join(work, 'certificates')
        os.mkdir(certdir, 0o700)
        zmq.auth.create_certificates(certdir, 'server')
        zmq.auth.create_certificates(certdir, 'client')
        print('starting %d healthy CURVE agents in %d processes on 127.0.0.1 ...'
              % (agents, len(AgentFarm(agents, certdir).sizes)), flush=True)
        farm = AgentFarm(agents, certdir).start()
        dead_ports = free_ports(dead, set(farm.ports))

        cfg = os.path.join(work, 'ansible.cfg')
        with open(cfg, 'w') as f:
            f.write('[defaults]\nlibrary = %s\nmodule_utils = %s\nhost_key_checking = False\n'
                    'retry_files_enabled = False\nlocalhost_warning = False\n'
                    % (os.path.join(args.repo, 'library'), os.path.join(args.repo, 'module_utils')))
        env = dict(os.environ, ANSIBLE_CONFIG=cfg, ANSIBLE_NOCOLOR='1',
                   ANSIBLE_LOCAL_TEMP=os.path.join(work, 'tmp'), ANSIBLE_REMOTE_TEMP=os.path.join(work, 'rtmp'),
                   ANSIBLE_INVENTORY_UNPARSED_WARNING='False')
        runner = Runner(playbook_bin, args.python, env, work, args.nofile, [p.pid for p in farm.procs])
        print('module interpreter %s, module RLIMIT_NOFILE %s' % (args.python, args.nofile or 'unchanged'))
        if not args.skip_fanout:
            print()
            fanout(runner, farm, dead_ports, certdir, args)
        if not args.skip_scale:
            print()
            scale(runner, farm, dead_ports, certdir, args)
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
