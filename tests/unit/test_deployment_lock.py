"""One operator at a time, and an audit trail: the deployment_lock role, its module and the
deployment_lock callback plugin, exercised with real ansible-playbook runs.

Two inventory hosts (alpha, beta) with a local connection stand for the lab's two machines;
each has its own lock and audit trail in a temporary directory. The runs use the project's
ansible.cfg (which enables the callback), so the lock is taken and released exactly as in
site.yml: concurrent runs, a failure in a later play, Ctrl-C, a corrupt lock, stale locks
and the break flag, check mode, the history table.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import load_source, run_module

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / 'ansible-playbook'
MODULE_PATH = REPO / 'roles' / 'deployment_lock' / 'library' / 'deployment_lock.py'
HOSTS = ('alpha', 'beta')
RUN_TIMEOUT = 180
RECAP_LINE = re.compile(r'^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$', re.MULTILINE)


def _load(name: str, path: Path):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


callback = _load('deployment_lock_callback', REPO / 'callback_plugins' / 'deployment_lock.py')
history_filters = _load('deployment_lock_filters', REPO / 'roles' / 'deployment_lock' / 'filter_plugins' / 'deployment_lock.py')
lock_module = load_source('_deployment_lock_module', str(MODULE_PATH))

PLAYBOOK = """\
- name: Take the lock, as site.yml's first play does
  hosts: ai_hosts
  gather_facts: false
  any_errors_fatal: true
  pre_tasks:
    - name: Take the deployment lock on every host this run changes
      ansible.builtin.import_role:
        name: deployment_lock
  tasks:
    - name: Keep a copy of the lock as this run holds it
      ansible.builtin.copy:
        src: "{{ ai_deploy_lock_path }}"
        dest: "{{ state_dir }}/{{ inventory_hostname }}/seen.json"
        remote_src: true
        mode: "0644"
      changed_when: false
      when: not ansible_check_mode

    - name: Wait until the test lets the run go on
      ansible.builtin.wait_for:
        path: "{{ go_file }}"
        timeout: 90
      when: go_file is defined

- name: Change, record and maybe fail, in a later play, one host at a time as site.yml's rollout
  hosts: ai_hosts
  order: inventory
  serial: 1
  gather_facts: false
  any_errors_fatal: true
  tasks:
    - name: Change the hosts named in change_hosts
      ansible.builtin.copy:
        content: "{{ lookup('ansible.builtin.env', 'AI_DEPLOY_RUN') }}"
        dest: "{{ state_dir }}/{{ inventory_hostname }}/changed-by"
        mode: "0644"
      when: inventory_hostname in change_hosts

    - name: Record the deploy for the audit trail
      ansible.builtin.include_role:
        name: deployment_lock
        tasks_from: record
      vars:
        deployment_record_result: "{{ 'failed' if inventory_hostname == fail_host else 'success' }}"
        deployment_record_services:
          - {name: advanced-router, state: "{{ 'bad_reply' if inventory_hostname == fail_host else 'healthy' }}", latency_ms: 1.5}
          - {name: translator-agent, state: healthy, latency_ms: 2.5}
        deployment_record_rolled_back: "{{ inventory_hostname == fail_host }}"
        deployment_record_images: {"registry:5000/ai-system/agent:1.2.0": "sha256:0123abcd"}
        deployment_record_detail: "{{ 'Rolled back to the last good deployment' if inventory_hostname == fail_host else '' }}"
      when: not ansible_check_mode

    - name: Fail on request
      ansible.builtin.fail:
        msg: "{{ inventory_hostname }} fails on purpose"
      when: inventory_hostname == fail_host

- name: A play that a failure never reaches
  hosts: ai_hosts
  gather_facts: false
  tasks:
    - name: Leave a mark
      ansible.builtin.copy:
        content: reached
        dest: "{{ state_dir }}/{{ inventory_hostname }}/last-play"
        mode: "0644"
      changed_when: false
"""


class Lab:
    """Two local hosts with their locks and audit trails under TMP."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state = tmp / 'state'
        for host in HOSTS:
            (self.state / host).mkdir(parents=True)
        self.inventory = tmp / 'hosts.yml'
        self.inventory.write_text(textwrap.dedent(f"""\
            all:
              children:
                ai_hosts:
                  hosts:
                    alpha: {{ai_machine_type: MAINPC}}
                    beta: {{ai_machine_type: PC2}}
                  vars:
                    ansible_connection: local
                    ansible_python_interpreter: {sys.executable}
                    state_dir: {self.state}
                    ai_deploy_lock_path: "{self.state}/{{{{ inventory_hostname }}}}/lock/deploy.lock"
                    ai_deploy_audit_path: "{self.state}/{{{{ inventory_hostname }}}}/log/deployments.jsonl"
                    change_hosts: [alpha]
                    fail_host: ""
                swarm_managers:
                  hosts:
                    alpha: {{}}
            """))
        self.playbook = tmp / 'work.yml'
        self.playbook.write_text(PLAYBOOK)
        self.go = tmp / 'go'

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith('ANSIBLE_') and k != 'AI_DEPLOY_RUN'}
        env.update(ANSIBLE_CONFIG=str(REPO / 'ansible.cfg'), ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0',
                   ANSIBLE_LOCAL_TEMP=str(self.tmp / 'ansible-local'), ANSIBLE_REMOTE_TMP=str(self.tmp / 'ansible-remote'))
        env.update(extra)
        return env

    def cmd(self, *args: str, playbook: Path | None = None) -> list[str]:
        return [str(ANSIBLE_PLAYBOOK), '-i', str(self.inventory), str(playbook or self.playbook), *args]

    def run(self, *args: str, playbook: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args, playbook=playbook), cwd=REPO, env=env or self.env(), text=True,
                              capture_output=True, timeout=RUN_TIMEOUT, check=False)

    def start(self, *args: str) -> subprocess.Popen:
        out = open(self.tmp / f'background-{time.monotonic_ns()}.log', 'w+')
        proc = subprocess.Popen(self.cmd(*args), cwd=REPO, env=self.env(), text=True, stdout=out,
                                stderr=subprocess.STDOUT)
        proc.log = out
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen) -> tuple[int, str]:
        rc = proc.wait(timeout=RUN_TIMEOUT)
        proc.log.seek(0)
        return rc, proc.log.read()

    def lock(self, host: str) -> Path:
        return self.state / host / 'lock' / 'deploy.lock'

    def audit(self, host: str) -> list[dict]:
        path = self.state / host / 'log' / 'deployments.jsonl'
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for_locks(self, proc: subprocess.Popen, hosts=HOSTS, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.lock(h).exists() for h in hosts):
            if proc.poll() is not None:
                pytest.fail('the run ended before it held the locks:\n' + self.finish(proc)[1][-3000:])
            if time.monotonic() > deadline:
                pytest.fail('the run never took the locks')
            time.sleep(0.2)

    def write_lock(self, host: str, content: str | dict) -> Path:
        path = self.lock(host)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path


@pytest.fixture
def lab(tmp_path):
    return Lab(tmp_path)


def stale_lock(age: float, **fields) -> dict:
    now = time.time()
    lock = {'run_id': 'old-run-1', 'operator': 'bob', 'controller': 'bobs-laptop', 'controller_id': 'ffffffffffffffff',
            'pid': 4242, 'process': '4242:1', 'playbook': 'site.yml', 'limit': 'pc2',
            'since_epoch': now - age, 'since': callback.utc_iso(now - age), 'version': 1}
    lock.update(fields)
    return lock


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters per host."""
    return {m['host']: {k: int(v) for k, v in (kv.split('=') for kv in m['counts'].split())}
            for m in RECAP_LINE.finditer(output.rsplit('PLAY RECAP', 1)[-1])}


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


def test_a_run_holds_the_lock_on_every_host_and_releases_it_with_one_audit_line_per_changed_host(lab):
    result = lab.run('--limit', 'alpha,beta')
    assert result.returncode == 0, result.stdout[-4000:]

    for host in HOSTS:
        seen = json.loads((lab.state / host / 'seen.json').read_text())
        assert seen['operator'] and seen['controller'] == socket.gethostname()
        assert seen['playbook'] == str(lab.playbook) and seen['limit'] == 'alpha,beta'
        assert seen['run_id'].startswith(time.strftime('%Y', time.gmtime())) and seen['since'].endswith('Z')
        assert seen['host'] == host and seen['pid'] > 0
        assert not lab.lock(host).exists(), 'released at the end of the run'
    assert json.loads((lab.state / 'alpha' / 'seen.json').read_text())['run_id'] == \
        json.loads((lab.state / 'beta' / 'seen.json').read_text())['run_id']

    # alpha changed: one line; beta changed nothing: none.
    [entry] = lab.audit('alpha')
    assert lab.audit('beta') == []
    assert entry['run_id'] == seen['run_id'] and entry['operator'] == seen['operator']
    assert entry['controller'] == socket.gethostname() and entry['playbook'] == str(lab.playbook)
    assert entry['limit'] == 'alpha,beta' and entry['host'] == 'alpha'
    assert entry['result'] == 'success' and entry['run_result'] == 'success' and entry['rolled_back'] is False
    assert entry['images'] == [{'image': 'registry:5000/ai-system/agent:1.2.0', 'tag': '1.2.0', 'digest': 'sha256:0123abcd'}]
    assert entry['services'] == {'advanced-router': 'healthy', 'translator-agent': 'healthy'}
    assert entry['action'] == 'deploy' and entry['changed'] == 1 and entry['lock_broken'] is None
    assert entry['time'].endswith('Z')
    # The lock is bookkeeping: an unchanged host reports changed=0.
    assert recap(result.stdout)['beta']['changed'] == 0
    assert f"released on alpha, beta; audit line written on alpha" in result.stdout

    # Each run gets its own id and its own line.
    again = lab.run()
    assert again.returncode == 0, again.stdout[-3000:]
    assert len(lab.audit('alpha')) == 2 and lab.audit('alpha')[1]['run_id'] != entry['run_id']
    assert lab.audit('alpha')[1]['limit'] is None


def test_a_second_run_fails_within_seconds_names_the_holder_and_changes_nothing(lab):
    first = lab.start('-e', f'go_file={lab.go}', '--limit', 'alpha,beta')
    try:
        lab.wait_for_locks(first)
        holder = json.loads(lab.lock('alpha').read_text())
        before = {h: lab.lock(h).read_bytes() for h in HOSTS}

        started = time.monotonic()
        second = lab.run('-e', 'change_hosts=["alpha","beta"]')
        elapsed = time.monotonic() - started
        assert second.returncode != 0
        assert elapsed < 30, f'the second run took {elapsed:.0f} s to fail'
        for text in (holder['run_id'], f"by {holder['operator']} on controller {holder['controller']}",
                     f"playbook {lab.playbook}", 'limit alpha,beta', 'still running on this controller', 'Nothing was changed'):
            assert text in second.stdout, text
        assert not any((lab.state / h / 'changed-by').exists() for h in HOSTS)
        # The refused run released nothing of the holder's.
        assert {h: lab.lock(h).read_bytes() for h in HOSTS} == before

        # A live run's lock is never broken, not even on request.
        forced = lab.run('-e', 'ai_deploy_lock_break=true')
        assert forced.returncode != 0 and 'still running on this controller' in forced.stdout
        assert {h: lab.lock(h).read_bytes() for h in HOSTS} == before
    finally:
        lab.go.touch()
        rc, output = lab.finish(first)
    assert rc == 0, output[-3000:]
    assert not any(lab.lock(h).exists() for h in HOSTS)
    assert [e['run_id'] for e in lab.audit('alpha')] == [holder['run_id']]


def test_two_runs_started_together_never_both_win(lab):
    runs = [lab.start('-e', f'go_file={lab.go}') for _ in range(2)]
    time.sleep(1)
    lab.go.touch()
    results = [lab.finish(run) for run in runs]
    winners = [output for rc, output in results if rc == 0]
    assert len(winners) <= 1, 'two runs held the same locks'
    for rc, output in results:
        if rc != 0:
            assert 'is held by run' in output, output[-3000:]
    assert not any(lab.lock(h).exists() for h in HOSTS)


def test_the_lock_is_released_when_the_run_fails_in_a_later_play(lab):
    result = lab.run('-e', 'fail_host=beta')
    assert result.returncode != 0
    assert 'beta fails on purpose' in result.stdout
    assert not (lab.state / 'alpha' / 'last-play').exists(), 'any_errors_fatal stopped the run'
    assert not any(lab.lock(h).exists() for h in HOSTS)
    # alpha changed, beta's deploy failed and was rolled back: one line each.
    [alpha] = lab.audit('alpha')
    [beta] = lab.audit('beta')
    assert alpha['result'] == 'success' and alpha['run_result'] == 'failed'
    assert beta['result'] == 'failed' and beta['rolled_back'] is True
    assert beta['services'] == {'advanced-router': 'bad_reply', 'translator-agent': 'healthy'}
    assert beta['detail'] == 'Rolled back to the last good deployment'


def test_the_lock_is_released_when_the_run_is_interrupted(lab):
    run = lab.start('-e', f'go_file={lab.go}')
    lab.wait_for_locks(run)
    time.sleep(1)
    run.send_signal(signal.SIGINT)
    rc, output = lab.finish(run)
    assert rc != 0
    assert 'released on alpha, beta' in output, output[-3000:]
    assert not any(lab.lock(h).exists() for h in HOSTS)


def test_a_corrupt_lock_is_refused_and_left_alone_until_broken(lab):
    lock = lab.write_lock('alpha', 'half a lock {')
    result = lab.run('-e', 'change_hosts=["alpha","beta"]')
    assert result.returncode != 0
    assert f'The deployment lock file {lock} on alpha is corrupt (not JSON' in result.stdout
    assert 'ai_deploy_lock_break=true' in result.stdout
    assert lock.read_text() == 'half a lock {'
    assert not lab.lock('beta').exists(), 'the lock taken on beta was released'
    assert not any((lab.state / h / 'changed-by').exists() for h in HOSTS)
    assert lab.audit('alpha') == lab.audit('beta') == []

    broken = lab.run('-e', 'ai_deploy_lock_break=true')
    assert broken.returncode == 0, broken.stdout[-3000:]
    assert not lock.exists()
    assert lab.audit('alpha')[-1]['lock_broken'] == {'corrupt': 'not JSON (13 bytes)'}


@pytest.mark.parametrize('content,reason', [
    ('', 'empty'),
    ('[1, 2]', 'not a JSON object'),
    ('{"operator": "bob"}', 'no run_id'),
    ('{"run_id": "x", "since_epoch": "yesterday"}', 'no since_epoch'),
])
def test_corrupt_lock_reasons(tmp_path, content, reason):
    path = tmp_path / 'deploy.lock'
    path.write_text(content)
    assert lock_module.read_lock(str(path))[:3] == ('corrupt', None, reason)


def test_a_symlink_in_place_of_the_lock_is_corrupt(tmp_path):
    (tmp_path / 'target').write_text(json.dumps(stale_lock(10)))
    (tmp_path / 'deploy.lock').symlink_to(tmp_path / 'target')
    assert lock_module.read_lock(str(tmp_path / 'deploy.lock'))[:3] == ('corrupt', None, 'a symlink')


def test_a_lock_from_another_controller_is_broken_only_when_older_than_the_stale_age(lab):
    young = stale_lock(600)
    lab.write_lock('alpha', young)
    refused = lab.run('-e', 'ai_deploy_lock_break=true')
    assert refused.returncode != 0
    assert 'held by run old-run-1 by bob on controller bobs-laptop (pid 4242), playbook site.yml, limit pc2' in refused.stdout
    assert 'cannot be broken yet' in refused.stdout
    assert json.loads(lab.lock('alpha').read_text()) == young

    # The age is configurable.
    shorter = lab.run('-e', 'ai_deploy_lock_break=true', '-e', 'ai_deploy_lock_stale_age=300')
    assert shorter.returncode == 0, shorter.stdout[-3000:]
    assert lab.audit('alpha')[-1]['lock_broken']['run_id'] == 'old-run-1'

    old = stale_lock(3 * 3600)
    lab.write_lock('beta', old)
    plain = lab.run()
    assert plain.returncode != 0
    assert 'It is older than 2 h 0 min (ai_deploy_lock_stale_age)' in plain.stdout
    assert 'break the lock with -e ai_deploy_lock_break=true' in plain.stdout
    assert json.loads(lab.lock('beta').read_text()) == old

    broken = lab.run('-e', 'ai_deploy_lock_break=true', '-e', 'change_hosts=["alpha","beta"]')
    assert broken.returncode == 0, broken.stdout[-3000:]
    assert not lab.lock('beta').exists()
    assert lab.audit('beta')[-1]['lock_broken']['operator'] == 'bob'


def test_a_lock_whose_run_is_gone_on_this_controller_can_be_broken_at_once(lab):
    gone = stale_lock(30, controller=socket.gethostname(), controller_id=callback.controller_id(),
                      process='999999999:1', pid=999999999)
    lab.write_lock('alpha', gone)
    plain = lab.run()
    assert plain.returncode != 0
    assert 'That run is gone (no such process on this controller)' in plain.stdout
    assert json.loads(lab.lock('alpha').read_text()) == gone

    # Nothing else changes in this run: the broken lock alone is worth its line.
    broken = lab.run('-e', 'ai_deploy_lock_break=true', '-e', 'change_hosts=[]')
    assert broken.returncode == 0, broken.stdout[-3000:]
    assert not lab.lock('alpha').exists()
    [entry] = lab.audit('alpha')
    assert entry['changed'] == 0 and entry['lock_broken']['process'] == '999999999:1'
    assert lab.audit('beta') == []


def test_check_mode_never_takes_nor_waits_for_the_lock(lab):
    held = {h: lab.write_lock(h, stale_lock(5)).read_bytes() for h in HOSTS}
    started = time.monotonic()
    result = lab.run('--check')
    assert result.returncode == 0, result.stdout[-3000:]
    assert time.monotonic() - started < 60
    assert {h: lab.lock(h).read_bytes() for h in HOSTS} == held
    for host in HOSTS:
        lab.lock(host).unlink()
    assert lab.run('--check', '--diff').returncode == 0
    assert not any(lab.lock(h).exists() for h in HOSTS)
    assert not any((lab.state / h / 'log').exists() for h in HOSTS)


def test_a_run_without_the_callback_is_refused_before_it_locks_anything(lab):
    result = lab.run(env=lab.env(ANSIBLE_CALLBACKS_ENABLED='ansible.posix.timer'))
    assert result.returncode != 0
    assert 'enable it (callbacks_enabled in ansible.cfg)' in result.stdout
    assert not any(lab.lock(h).parent.exists() for h in HOSTS)


def test_the_lock_is_taken_again_by_the_same_run_without_harm(lab):
    twice = lab.tmp / 'twice.yml'
    twice.write_text(textwrap.dedent("""\
        - name: Take the lock, as rotate-keys.yml does before it imports site.yml
          hosts: ai_hosts
          gather_facts: false
          roles: [deployment_lock]
        - name: Take it again, as site.yml does
          hosts: ai_hosts
          gather_facts: false
          roles: [deployment_lock]
        """))
    result = lab.run(playbook=twice)
    assert result.returncode == 0, result.stdout[-3000:]
    assert not any(lab.lock(h).exists() for h in HOSTS)


def test_a_limited_run_locks_only_its_hosts_and_tags_do_not_skip_the_lock(lab):
    held = lab.write_lock('beta', stale_lock(5)).read_bytes()
    result = lab.run('--limit', 'alpha', '--tags', 'none-of-these')
    assert result.returncode == 0, result.stdout[-3000:]
    assert 'Take the deployment lock' in result.stdout and 'released on alpha; no host changed' in result.stdout
    assert not lab.lock('alpha').exists() and lab.lock('beta').read_bytes() == held


def test_manage_history_shows_the_last_entries_as_a_table(lab):
    lab.run('-e', 'change_hosts=["alpha","beta"]')
    lab.run('-e', 'fail_host=beta')
    with (lab.state / 'beta' / 'log' / 'deployments.jsonl').open('a') as f:
        f.write('not json\n')
    result = lab.run('-e', 'action=history', '-e', 'ai_deploy_history_entries=3', playbook=REPO / 'playbooks' / 'manage.yml')
    assert result.returncode == 0, result.stdout[-3000:]
    table = [line.strip().strip('",') for line in result.stdout.split('"msg": [', 1)[1].split(']', 1)[0].splitlines() if line.strip()]
    assert table[0].split() == ['TIME', 'HOST', 'OPERATOR@CONTROLLER', 'PLAYBOOK', '(ACTION)', 'LIMIT', 'RESULT', 'ROLLED',
                                'BACK', 'IMAGES', 'SERVICES']
    assert len(table) == 4
    assert 'alpha' in table[1] and 'success' in table[1]
    assert 'beta' in table[2] and 'failed' in table[2] and ' yes ' in table[2] and 'advanced-router: bad_reply' in table[2]
    assert '(unreadable line)' in table[3]
    assert recap(result.stdout)['alpha']['changed'] == 0
    assert not any(lab.lock(h).exists() for h in HOSTS), 'history only reads'


def test_site_and_manage_take_the_lock_before_anything_else():
    env = {k: v for k, v in os.environ.items() if not k.startswith('ANSIBLE_')}
    env['ANSIBLE_CONFIG'] = str(REPO / 'ansible.cfg')
    for playbook, first in (('site.yml', 'deployment_lock : Take the deployment lock'),
                            ('playbooks/manage.yml', 'Check the requested action')):
        listed = subprocess.run([str(ANSIBLE_PLAYBOOK), '--list-tasks', '-i', 'inventory/production', playbook], cwd=REPO,
                                env=env, text=True, capture_output=True, timeout=RUN_TIMEOUT, check=True).stdout
        tasks = [line.strip() for line in listed.splitlines()
                 if 'TAGS:' in line and 'Validating arguments' not in line and not line.strip().startswith('play #')]
        assert tasks[0].startswith(first), tasks[:3]
        assert 'TAGS: [always]' in next(t for t in tasks if 'Take the deployment lock' in t)


# ---------------------------------------------------------------------------------------------
# The module, the callback's helpers, the history filter
# ---------------------------------------------------------------------------------------------


def _take(args):
    path, run_id, start = args
    while time.time() < start:
        time.sleep(0.0005)
    result = run_module(lock_module, {'path': path, 'run': {'run_id': run_id}})
    return run_id if not result.get('failed') else None


def test_concurrent_writers_never_both_win(tmp_path):
    context = multiprocessing.get_context('fork')
    with context.Pool(8) as pool:
        for trial in range(15):
            path = str(tmp_path / f'trial-{trial}' / 'deploy.lock')
            start = time.time() + 0.3
            winners = [w for w in pool.map(_take, [(path, f'run-{i}', start) for i in range(8)]) if w]
            assert len(winners) == 1, winners
            assert json.loads(Path(path).read_text())['run_id'] == winners[0]


def test_a_link_never_replaces_an_existing_lock(tmp_path):
    path = tmp_path / 'deploy.lock'
    path.write_text('theirs')
    assert lock_module.write_new(str(path), {'run_id': 'mine'}) is False
    assert path.read_text() == 'theirs'
    assert [p.name for p in tmp_path.iterdir()] == ['deploy.lock'], 'no temporary file left behind'


def test_release_leaves_another_runs_lock_alone(tmp_path):
    path = tmp_path / 'deploy.lock'
    path.write_text(json.dumps(stale_lock(5)))
    audit = tmp_path / 'log' / 'deployments.jsonl'
    result = run_module(lock_module, {'path': str(path), 'state': 'absent', 'run': {'run_id': 'mine'},
                                      'audit_path': str(audit), 'audit_entry': {'result': 'success'}})
    assert result['released'] is False and result['audit_written'] is True
    assert json.loads(path.read_text())['run_id'] == 'old-run-1'
    assert json.loads(audit.read_text()) == {'result': 'success'}
    assert oct(audit.stat().st_mode & 0o777) == '0o640'


def test_check_mode_of_the_module_writes_nothing(tmp_path):
    path = tmp_path / 'deploy.lock'
    result = run_module(lock_module, {'path': str(path), 'run': {'run_id': 'mine'}}, check_mode=True)
    assert result['changed'] is True and result['deployment_lock']['state'] == 'checked'
    assert not path.exists()


def test_the_run_is_described_for_the_lock():
    token = callback.process_token(os.getpid())
    assert token and token.startswith(f'{os.getpid()}:')
    # live_runs lists the processes of Ansible runs (their command line names ansible), this one only if it is one
    assert (token in callback.live_runs()) == (b'ansible' in Path(f'/proc/{os.getpid()}/cmdline').read_bytes())
    assert callback.process_token(999999999) is None
    assert callback.image_list({'reg:5000/ai/agent:1.2': 'sha256:1', 'reg:5000/ai/agent': ''}) == [
        {'image': 'reg:5000/ai/agent:1.2', 'tag': '1.2', 'digest': 'sha256:1'},
        {'image': 'reg:5000/ai/agent', 'tag': 'latest', 'digest': ''}]


def test_history_table_keeps_the_newest_entries_of_all_hosts():
    def line(t, host, **kw):
        return json.dumps(dict(dict(time=t, host=host, operator='ann', controller='c', playbook='site.yml', limit=None,
                                    result='success', rolled_back=False, images=[], services={}), **kw))

    table = history_filters.deployment_history_table({
        'a': [line('2026-01-01T00:00:01Z', 'a'), line('2026-01-01T00:00:03Z', 'a')],
        'b': [line('2026-01-01T00:00:02Z', 'b', action='stop', services={'x': 'stopped'})],
    }, 2)
    assert len(table) == 3
    assert table[1].split()[:2] == ['2026-01-01T00:00:02Z', 'b'] and 'site.yml (stop)' in table[1] and '1/1 stopped' in table[1]
    assert table[2].split()[:2] == ['2026-01-01T00:00:03Z', 'a']
    assert history_filters.deployment_history_table({}, 5)[1] == '(no deployments recorded)'
