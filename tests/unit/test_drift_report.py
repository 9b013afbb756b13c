"""Tests of the drift check: ``callback_plugins/drift_report.py`` and ``scripts/drift-check``.

The redaction helpers are tested directly. The end-to-end tests run the real script (and
through it the real ``ansible-playbook --check --diff`` with the callback) against localhost
in a temporary directory: converged state, file drift with a CurveZMQ secret in the diff,
runtime drift (``drift_findings``, ``Drift:`` tasks), a failed task and an unreachable host.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / 'callback_plugins' / 'drift_report.py'
SCRIPT = REPO / 'scripts' / 'drift-check'
Z85 = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#'


def _load(name: str, path: Path):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


drift_report = _load('drift_report_plugin', PLUGIN)
drift_check = _load('drift_check_script', SCRIPT)


def z85_key() -> str:
    return ''.join(secrets.choice(Z85) for _ in range(40))


def zmq_secret_certificate(public: str, secret: str) -> str:
    """A certificate file as pyzmq's zmq.auth.create_certificates writes it."""
    # Built line by line so that no line of this file looks like a committed secret key.
    lines = [
        "#   ****  Generated on 2025-01-01 02:30:00.000000 by pyzmq  ****",
        "#   ZeroMQ CURVE **Secret** Certificate",
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public}"',
        "    " + "secret" + f'-key = "{secret}"',
    ]
    return "\n".join(lines) + "\n"


PEM = textwrap.dedent('''\
    -----BEGIN OPENSSH PRIVATE KEY-----
    b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
    QyNTUxOQAAACDRrDtC1dUmmyJq3QePEMdqVgUZd2V9Pm3EO7HZbAPqQwAAAJgyXs8JMl7P
    -----END OPENSSH PRIVATE KEY-----
    ''')
PEM_BODY = ('b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW',
            'QyNTUxOQAAACDRrDtC1dUmmyJq3QePEMdqVgUZd2V9Pm3EO7HZbAPqQwAAAJgyXs8JMl7P')


# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['secret', 'secret-key', 'client_secret', 'key_secret', 'SECRET_KEY', 'password',
                                  'db_password', 'passwd', 'api_token', 'apiToken', 'tokens', 'private',
                                  'private_key', 'privateKey', 'credentials'])
def test_secret_key_names(name):
    assert drift_report.is_secret_key(name)


@pytest.mark.parametrize('name', ['public-key', 'public_key', 'tokenizer', 'path', 'state', 'keys', 'mode'])
def test_harmless_key_names(name):
    assert not drift_report.is_secret_key(name)


def test_zmq_certificate_secret_is_redacted():
    public, secret = z85_key(), z85_key()
    redacted = drift_report.redact_text(zmq_secret_certificate(public, secret))
    assert secret not in redacted
    assert '    secret-key = "<redacted>"\n' in redacted
    assert f'public-key = "{public}"' in redacted  # public material stays readable
    assert redacted.count('\n') == zmq_secret_certificate(public, secret).count('\n')


def test_zmq_certificate_in_a_unified_diff_and_as_json():
    old, new = z85_key(), z85_key()
    diff = f'--- before: /opt/c/client.key_secret\n+++ after\n-    secret-key = "{old}"\n+    secret-key = "{new}"\n'
    redacted = drift_report.redact_text(diff)
    assert old not in redacted and new not in redacted
    assert '-    secret-key = "<redacted>"\n+    secret-key = "<redacted>"\n' in redacted
    # The same content inside a JSON string (escaped quotes and newlines), e.g. a module argument.
    as_json = json.dumps({'content': zmq_secret_certificate(z85_key(), new)})
    assert new not in drift_report.redact_text(as_json)


def test_json_secret_and_token_values_are_redacted():
    text = json.dumps({'secret': 's3cr3t-value', 'api_token': 'tok-123456', 'tokenizer': 'bert',
                       'nested': {'password': 'hunter2'}, 'msg': 'login failed: db_password: letmein'})
    redacted = drift_report.redact_text(text)
    for value in ('s3cr3t-value', 'tok-123456', 'hunter2', 'letmein'):
        assert value not in redacted
    assert json.loads(redacted)['api_token'] == '<redacted>'
    assert json.loads(redacted)['tokenizer'] == 'bert'


def test_yaml_and_ini_style_text():
    text = 'user: bob\npassword: hunter2\nsecret_key = abc123def\nprivate_token: |\n  line-one\n  line-two\nport: 8120\n'
    redacted = drift_report.redact_text(text)
    for value in ('hunter2', 'abc123def', 'line-one', 'line-two'):
        assert value not in redacted
    assert 'user: bob\n' in redacted and 'port: 8120\n' in redacted


def test_pem_private_key_block():
    redacted = drift_report.redact_text('before\n' + PEM + 'after: 1\n')
    assert not any(line in redacted for line in PEM_BODY)
    assert '-----BEGIN OPENSSH PRIVATE KEY-----' in redacted and '-----END OPENSSH PRIVATE KEY-----' in redacted
    assert redacted.endswith('after: 1\n')
    # One line (JSON), and a block cut off before its END line.
    assert not any(line in drift_report.redact_text(json.dumps(PEM)) for line in PEM_BODY)
    assert not any(line in drift_report.redact_text(PEM.split('-----END')[0]) for line in PEM_BODY)


def test_cut_off_pem_block_ends_at_a_markdown_fence():
    redacted = drift_report.redact_text(PEM.split('-----END')[0] + '```\n## next host\n')
    assert not any(line in redacted for line in PEM_BODY)
    assert redacted.endswith('```\n## next host\n')


def test_pem_block_in_diff_keeps_prefixes():
    diff = ''.join('+' + line for line in PEM.splitlines(keepends=True))
    redacted = drift_report.redact_text(diff)
    assert redacted.splitlines() == ['+-----BEGIN OPENSSH PRIVATE KEY-----', '+<redacted>', '+<redacted>',
                                     '+-----END OPENSSH PRIVATE KEY-----']


def test_z85_on_a_line_that_mentions_secret():
    key = z85_key()
    assert key not in drift_report.redact_text(f'the secret of the server is {key}\n')
    assert key not in drift_report.redact_text(f'--curve-secret={key}\n')
    assert key in drift_report.redact_text(f'server public key {key}\n')
    path = '/opt/ai-system/certificates/health-probe/client.key_secret'
    assert drift_report.redact_text(f'--- before: {path}\n') == f'--- before: {path}\n'


def test_redact_structures():
    key = z85_key()
    data = {'client_secret_key': key, 'private': False, 'items': [{'token': 'abc'}, f'secret-key = "{key}"'],
            'public_key': 'pub'}
    redacted = drift_report.redact(data)
    assert key not in json.dumps(redacted) and 'abc' not in json.dumps(redacted)
    assert redacted['private'] is False and redacted['public_key'] == 'pub'


def test_markdown_diff_is_truncated_per_entry():
    unified = ''.join(f'+line {n}\n' for n in range(50))
    entry = {'host': 'h', 'play': 'p', 'role': '', 'task': 't', 'action': 'ansible.builtin.copy', 'status': 'changed',
             'kind': 'changed', 'summary': 'copy would change /x (+50 -0 lines)', 'diffs': [{'unified': unified}]}
    counts = dict.fromkeys(('ok', 'changed', 'failed', 'unreachable', 'skipped', 'ignored', 'errors'), 0)
    report = {'started': 's', 'finished': 'f', 'playbooks': ['site.yml'], 'inventory': ['inv'], 'limit': None,
              'check_mode': True, 'diff_mode': True, 'summary': {'status': 'drift'},
              'hosts': {'h': dict(counts, drift=1, changed=1)}, 'drift': [entry], 'errors': []}
    markdown = drift_report.render_markdown(report, max_diff_lines=5)
    assert '+line 4\n... (truncated; the full diff is in drift-report.json)\n```' in markdown
    assert '+line 5' not in markdown


# ---------------------------------------------------------------------------------------------
# Script helpers
# ---------------------------------------------------------------------------------------------


def test_help_documents_options_and_exit_status():
    result = subprocess.run([sys.executable, str(SCRIPT), '--help'], check=True, capture_output=True, text=True)
    for text in ('--inventory', '--limit', '--report', '--playbook', '--extra-vars', '--keep', 'exit status', 'latest'):
        assert text in result.stdout


def test_prune_keeps_the_newest_report_dirs(tmp_path):
    names = ['20250101T023000Z', '20250102T023000Z', '20250102T023000Z-1', '20250103T023000Z']
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'latest').symlink_to(names[-1])
    removed = drift_check.prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[2:], 'notes', 'latest'])


def test_exit_status_error_wins_over_drift():
    report = {'hosts': {'a': {'status': 'checked'}}, 'drift': [{}], 'errors': []}
    assert drift_check.evaluate(report, 0)[0] == 2
    assert drift_check.evaluate(dict(report, drift=[]), 0)[0] == 0
    assert drift_check.evaluate(dict(report, errors=[{}]), 4)[0] == 1
    assert drift_check.evaluate(report, 1)[0] == 1  # ansible-playbook error
    assert drift_check.evaluate(None, 0)[0] == 1  # no report
    assert drift_check.evaluate(dict(report, hosts={}, drift=[]), 0)[0] == 1  # nothing checked
    # A host not fully checked is an error, drift or not.
    for status in ('partially checked', 'not checked'):
        code, problems = drift_check.evaluate(dict(report, hosts={'a': {'status': 'checked'}, 'b': {'status': status}}), 0)
        assert (code, problems) == (1, ['1 host(s) not fully checked: b'])


def test_environment_extends_the_configured_callbacks(monkeypatch, tmp_path):
    cfg = tmp_path / 'ansible.cfg'
    cfg.write_text('[defaults]\ncallbacks_enabled = ansible.posix.timer\ncallback_plugins = plugins/cb\n')
    for name in ('ANSIBLE_CALLBACKS_ENABLED', 'ANSIBLE_CALLBACK_PLUGINS'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('ANSIBLE_CONFIG', str(cfg))
    env = drift_check.ansible_env(tmp_path / 'run')
    assert env['ANSIBLE_CALLBACKS_ENABLED'] == 'ansible.posix.timer,drift_report'
    assert env['ANSIBLE_CALLBACK_PLUGINS'].split(os.pathsep) == [str(PLUGIN.parent), str(tmp_path / 'plugins' / 'cb')]
    assert env['DRIFT_REPORT_DIR'] == str(tmp_path / 'run')


# ---------------------------------------------------------------------------------------------
# End to end: scripts/drift-check -> ansible-playbook --check --diff -> drift_report
# ---------------------------------------------------------------------------------------------

PLAYBOOK = '''\
- name: Drift test
  hosts: all
  gather_facts: false
  vars:
    target_dir: "{{ playbook_dir }}/target"
  tasks:
    - name: Target directory
      ansible.builtin.file:
        path: "{{ target_dir }}"
        state: directory
        mode: "0700"
    - name: Managed config file
      ansible.builtin.copy:
        dest: "{{ target_dir }}/app.conf"
        content: "port = 8120\\nworkers = 4\\n"
        mode: "0644"
    - name: ZeroMQ client secret certificate
      ansible.builtin.copy:
        src: "{{ playbook_dir }}/files/client.key_secret"
        dest: "{{ target_dir }}/client.key_secret"
        mode: "0600"
      diff: true
    - name: Per-agent files
      ansible.builtin.copy:
        dest: "{{ target_dir }}/{{ item }}.txt"
        content: "{{ item }}\\n"
        mode: "0644"
      loop: [tts, responder]
    - name: Hidden file
      ansible.builtin.copy:
        dest: "{{ target_dir }}/hidden.txt"
        content: "HIDDEN-MARKER-7f3a\\n"
        mode: "0600"
      no_log: true
'''

RUNTIME_PLAYBOOK = '''\
- name: Runtime drift
  hosts: all
  gather_facts: false
  tasks:
    - name: "Drift: services healthy"
      ansible.builtin.debug:
        var: drift_findings
      vars:
        drift_findings:
          - "tts-agent (tcp://127.0.0.1:6563): auth_failed"
          - {service: responder, state: timeout}
    - name: "Drift: ports open"
      ansible.builtin.fail:
        msg: port 5556 is closed
      ignore_errors: true
    - name: "Drift: nothing found"
      ansible.builtin.debug:
        var: drift_findings
      vars:
        drift_findings: []
    - name: An ignored failure is neither drift nor an error
      ansible.builtin.fail:
        msg: ignored
      ignore_errors: true
'''

FAILING_PLAYBOOK = '''\
- name: Broken check
  hosts: all
  gather_facts: false
  tasks:
    - name: A task that fails without a drift marker
      ansible.builtin.fail:
        msg: the check itself is broken
'''

# Shaped like site.yml: plays on all hosts and on a subgroup, with any_errors_fatal. `ghost` is
# unreachable (ssh to a closed port of 127.0.0.1); --limit 'all:!ghost' leaves the reachable hosts.
COVERAGE_PLAYBOOK = '''\
- name: Local checks
  hosts: local
  gather_facts: false
  tasks:
    - name: "Drift: local state"
      ansible.builtin.debug:
        var: drift_findings
      vars:
        drift_findings: "{{ ['alpha differs'] if inventory_hostname == 'alpha' else [] }}"

- name: Engine on every host
  hosts: lab
  gather_facts: false
  any_errors_fatal: true
  tasks:
    - name: Reach the host
      ansible.builtin.ping:
    - name: Read the engine
      ansible.builtin.debug:
        msg: engine read

- name: GPU hosts
  hosts: gpu
  gather_facts: false
  any_errors_fatal: true
  tasks:
    - name: Read the GPU runtime
      ansible.builtin.debug:
        msg: runtime read

- name: Summary
  hosts: lab
  gather_facts: false
  tasks:
    - name: Show the summary
      ansible.builtin.debug:
        msg: summary
'''

COVERAGE_INVENTORY = '''\
[local]
alpha ansible_connection=local ansible_python_interpreter={python}
beta ansible_connection=local ansible_python_interpreter={python}

[remote]
ghost ansible_host=127.0.0.1 ansible_port=1 ansible_connection=ssh ansible_user=nobody ansible_ssh_common_args="-o ConnectTimeout=3 -o BatchMode=yes"

[lab:children]
local
remote

[gpu]
beta
'''

# site.yml's other shapes: a check-mode `meta: end_host` (prepare, swarm), a rescued failure
# (the deploy's rollback) and a serial, any_errors_fatal rollout that a failed gate stops.
ROLLOUT_PLAYBOOK = '''\
- name: Prepare
  hosts: local
  gather_facts: false
  tasks:
    - name: Stop here in check mode on alpha
      ansible.builtin.meta: end_host
      when: inventory_hostname == 'alpha'
    - name: Read the engine
      ansible.builtin.debug:
        msg: engine read

- name: Rollout, one host at a time
  hosts: local
  serial: 1
  any_errors_fatal: true
  gather_facts: false
  tasks:
    - name: Deploy with rollback
      block:
        - name: Deploy
          ansible.builtin.fail:
            msg: deploy failed
          when: inventory_hostname == (rescue_on | default(''))
      rescue:
        - name: Roll back
          ansible.builtin.debug:
            msg: rolled back
    - name: Health gate
      ansible.builtin.fail:
        msg: the gate failed
      when: inventory_hostname == (gate_fails_on | default(''))

- name: Summary
  hosts: local
  gather_facts: false
  tasks:
    - name: Show the summary
      ansible.builtin.debug:
        msg: summary
'''


class Project:
    """A playbook, its source files and a converged target directory under a tmp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.target = root / 'target'
        self.reports = root / 'reports'
        self.public, self.secret = z85_key(), z85_key()
        (root / 'files').mkdir()
        (root / 'files' / 'client.key_secret').write_text(zmq_secret_certificate(self.public, self.secret))
        (root / 'site.yml').write_text(PLAYBOOK)
        (root / 'runtime.yml').write_text(RUNTIME_PLAYBOOK)
        (root / 'failing.yml').write_text(FAILING_PLAYBOOK)
        local = f'localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n'
        (root / 'hosts.ini').write_text('[lab]\n' + local)
        (root / 'unreachable.ini').write_text(
            '[lab]\n' + local + 'ghost ansible_host=127.0.0.1 ansible_port=1 ansible_connection=ssh '
            'ansible_user=nobody ansible_ssh_common_args="-o ConnectTimeout=3 -o BatchMode=yes"\n')
        (root / 'coverage.yml').write_text(COVERAGE_PLAYBOOK)
        (root / 'rollout.yml').write_text(ROLLOUT_PLAYBOOK)
        (root / 'coverage.ini').write_text(COVERAGE_INVENTORY.format(python=sys.executable))
        self.env = {k: v for k, v in os.environ.items() if k != 'DRIFT_REPORT_DIR'}
        self.env['ANSIBLE_LOCAL_TEMP'] = str(root / '.ansible-tmp')

    def converge(self) -> None:
        ansible_playbook = Path(sys.executable).parent / 'ansible-playbook'
        subprocess.run([str(ansible_playbook), '-i', str(self.root / 'hosts.ini'), str(self.root / 'site.yml')],
                       cwd=REPO, env=self.env, check=True, capture_output=True, timeout=120)

    def check(self, *args: str, inventory: str = 'hosts.ini', playbook: str = 'site.yml') -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(SCRIPT), '-i', str(self.root / inventory), '--playbook', str(self.root / playbook),
               '--report', str(self.reports), *args]
        return subprocess.run(cmd, check=False, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=120)

    def latest(self) -> tuple[Path, dict, str]:
        run_dir = (self.reports / 'latest').resolve()
        report = json.loads((run_dir / 'drift-report.json').read_text())
        return run_dir, report, (run_dir / 'drift-report.md').read_text()

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(self.target.iterdir())}

    def restore(self, snapshot: dict[str, tuple[bytes, int]]) -> None:
        for path in self.target.iterdir():
            if path.name not in snapshot:
                path.unlink()
        for name, (content, mode) in snapshot.items():
            (self.target / name).write_bytes(content)
            os.chmod(self.target / name, mode)


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    project = Project(tmp_path_factory.mktemp('drift'))
    project.converge()
    return project


@pytest.fixture
def drifted(project):
    """The target with drift: another secret key pair, an edited config, a missing loop item file."""
    converged = project.snapshot()
    old_public, old_secret = z85_key(), z85_key()
    (project.target / 'client.key_secret').write_text(zmq_secret_certificate(old_public, old_secret))
    (project.target / 'app.conf').write_text('port = 8120\nworkers = 2\n')
    (project.target / 'responder.txt').unlink()
    (project.target / 'hidden.txt').write_text('HIDDEN-MARKER-old\n')
    yield old_secret
    project.restore(converged)


def report_text(run_dir: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(run_dir.iterdir()))


def test_converged_state_has_no_drift(project):
    before = project.snapshot()
    result = project.check()
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir, report, markdown = project.latest()
    assert report['summary'] == {'status': 'clean', 'hosts': 1, 'checked': 1, 'partially_checked': 0,
                                 'not_checked': 0, 'drift': 0, 'errors': 0}
    assert report['hosts']['localhost']['status'] == 'checked'
    assert report['hosts']['localhost']['plays_checked'] == ['Drift test']
    assert report['check_mode'] and report['diff_mode']
    assert report['hosts']['localhost']['ok'] == 6  # 5 tasks, the loop counted per item
    assert report['drift'] == [] and report['errors'] == []
    assert '# Drift report: no drift' in markdown and 'No drift.' in markdown
    assert 'no drift' in result.stdout and str(run_dir / 'drift-report.md') in result.stdout
    assert (run_dir / 'ansible.log').is_file()
    assert project.snapshot() == before


def test_drift_is_reported_with_redacted_diffs(project, drifted):
    old_secret = drifted
    before = project.snapshot()
    result = project.check()
    assert result.returncode == 2, result.stdout + result.stderr
    assert project.snapshot() == before, 'the check changed the host'

    run_dir, report, markdown = project.latest()
    assert report['summary']['status'] == 'drift'
    by_task = {(d['task'], d.get('item')): d for d in report['drift']}
    assert set(by_task) == {('Managed config file', None), ('ZeroMQ client secret certificate', None),
                            ('Per-agent files', 'responder'), ('Hidden file', None)}
    cert = by_task[('ZeroMQ client secret certificate', None)]
    assert cert['host'] == 'localhost' and cert['action'] == 'ansible.builtin.copy' and cert['kind'] == 'changed'
    unified = cert['diffs'][0]['unified']
    assert '-    secret-key = "<redacted>"\n' in unified and '+    secret-key = "<redacted>"\n' in unified
    assert unified.startswith(f"--- before: {project.target / 'client.key_secret'}\n")
    assert f"copy would change {project.target / 'client.key_secret'} (+2 -2 lines)" == cert['summary']
    assert by_task[('Hidden file', None)]['summary'] == '(hidden: no_log)'
    assert by_task[('Hidden file', None)]['diffs'] == []

    assert '## localhost' in markdown and '### 2. ZeroMQ client secret certificate' in markdown
    assert '```diff\n--- before: ' in markdown and '-workers = 2\n+workers = 4\n' in markdown
    assert 'localhost: checked, 4 drift' in result.stdout

    # No secret anywhere: report, Markdown, the playbook log, stdout.
    everything = report_text(run_dir) + result.stdout + result.stderr
    for value in (project.secret, old_secret, 'HIDDEN-MARKER'):
        assert value not in everything
    assert 'secret-key = "<redacted>"' in (run_dir / 'ansible.log').read_text()


def test_unreachable_host_is_an_error_and_wins_over_drift(project, drifted):
    if shutil.which('ssh') is None:
        pytest.skip('needs the ssh client')
    result = project.check(inventory='unreachable.ini')
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir, report, markdown = project.latest()
    assert report['summary']['status'] == 'error'
    assert [(e['host'], e['status']) for e in report['errors']] == [('ghost', 'unreachable')]
    assert report['hosts']['localhost']['drift'] == 4  # the drift is still reported
    assert '**unreachable**' in markdown
    # No any_errors_fatal: the play goes on for localhost, which is checked; ghost is not.
    assert report['hosts']['localhost']['status'] == 'checked'
    assert report['hosts']['ghost']['status'] == 'not checked'
    assert report['hosts']['ghost']['plays'] == [
        {'index': 1, 'play': 'Drift test', 'status': 'unreachable', 'reason': 'at task "Target directory"'}]
    assert 'ghost: not checked, 0 drift, 1 error(s) (unreachable); localhost: checked, 4 drift' in result.stdout
    assert '1 host(s) not fully checked: ghost.' in result.stdout
    assert drifted not in report_text(run_dir) + result.stdout


def test_runtime_drift_findings(project):
    result = project.check('--limit', 'localhost', playbook='runtime.yml')
    assert result.returncode == 2, result.stdout + result.stderr
    _run_dir, report, markdown = project.latest()
    assert report['limit'] == 'localhost'
    assert [(d['task'], d['kind']) for d in report['drift']] == [
        ('Drift: services healthy', 'findings'), ('Drift: ports open', 'check_failed')]
    assert report['drift'][0]['findings'][1] == {'service': 'responder', 'state': 'timeout'}
    assert report['drift'][1]['summary'] == 'port 5556 is closed'
    assert report['errors'] == [] and report['hosts']['localhost']['ignored'] == 2
    assert '- tts-agent (tcp://127.0.0.1:6563): auth_failed' in markdown


def test_failed_task_without_marker_is_an_error(project):
    result = project.check('--keep', '1', playbook='failing.yml')
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir, report, markdown = project.latest()
    assert report['errors'][0]['msg'] == 'the check itself is broken'
    assert 'the check itself is broken' in markdown
    # --keep 1: only this run's directory is left.
    assert sorted(p.name for p in project.reports.iterdir()) == sorted([run_dir.name, 'latest'])


def host_section(markdown: str, host: str) -> str:
    """The Markdown report's section of HOST (from its heading to the next host's)."""
    return markdown.split(f'\n## {host}\n', 1)[1].split('\n## ', 1)[0]


def test_hosts_cut_off_by_an_unreachable_host_are_not_called_clean(project):
    """Issue 10, item 4: one host unreachable, any_errors_fatal stops the others' later plays."""
    if shutil.which('ssh') is None:
        pytest.skip('needs the ssh client')
    result = project.check(inventory='coverage.ini', playbook='coverage.yml')
    assert result.returncode == 1, result.stdout + result.stderr
    _run_dir, report, markdown = project.latest()

    # The report must not call the hosts whose later plays never ran clean.
    for host in ('alpha', 'beta', 'ghost'):
        assert 'No drift.' not in host_section(markdown, host), host

    hosts = report['hosts']
    assert {h: hosts[h]['status'] for h in hosts} == {
        'alpha': 'partially checked', 'beta': 'partially checked', 'ghost': 'not checked'}
    assert hosts['alpha']['plays_checked'] == ['Local checks']
    assert [(p['play'], p['status']) for p in hosts['alpha']['plays']] == [
        ('Local checks', 'checked'), ('Engine on every host', 'stopped'), ('Summary', 'not run')]
    assert [(p['play'], p['status']) for p in hosts['beta']['plays']] == [
        ('Local checks', 'checked'), ('Engine on every host', 'stopped'), ('GPU hosts', 'not run'),
        ('Summary', 'not run')]
    assert [(p['play'], p['status']) for p in hosts['ghost']['plays']] == [
        ('Engine on every host', 'unreachable'), ('Summary', 'not run')]
    assert 'any_errors_fatal' in hosts['alpha']['plays'][1]['reason']
    assert hosts['ghost']['plays_checked'] == []
    assert report['summary'] == {'status': 'error', 'hosts': 3, 'checked': 0, 'partially_checked': 2,
                                 'not_checked': 1, 'drift': 1, 'errors': 1}
    # What was checked is still reported.
    assert [(d['host'], d['task']) for d in report['drift']] == [('alpha', 'Drift: local state')]

    alpha = host_section(markdown, 'alpha')
    assert '**Partially checked**: 1 of 3 plays ran to their end on this host:\n\n- Local checks: checked\n' in alpha
    assert '- Engine on every host: stopped (ghost was unreachable and the play has any_errors_fatal)\n' in alpha
    assert '- Summary: not run (the host was stopped in an earlier play: Engine on every host)\n' in alpha
    assert '**Not checked**' in host_section(markdown, 'ghost')
    assert '- Engine on every host: unreachable (at task "Reach the host")' in host_section(markdown, 'ghost')
    assert '| alpha | partially checked |' in markdown

    out = result.stdout
    assert 'alpha: partially checked (plays checked: "Local checks"), 1 drift' in out, out
    assert 'ghost: not checked, 0 drift, 1 error(s) (unreachable)' in out, out
    assert '3 host(s) not fully checked' in out, out
    assert '3 host(s), 0 fully checked (' in out, out


def test_every_play_that_targets_a_host_ran_to_its_end(project):
    """The same run without the unreachable host: each host checked, by the plays that target it."""
    result = project.check('--limit', 'all:!ghost', inventory='coverage.ini', playbook='coverage.yml')
    assert result.returncode == 2, result.stdout + result.stderr
    _run_dir, report, markdown = project.latest()
    hosts = report['hosts']
    assert sorted(hosts) == ['alpha', 'beta']  # --limit: ghost is not in the report at all
    assert {h: hosts[h]['status'] for h in hosts} == {'alpha': 'checked', 'beta': 'checked'}
    assert hosts['alpha']['plays_checked'] == ['Local checks', 'Engine on every host', 'Summary']
    assert hosts['beta']['plays_checked'] == ['Local checks', 'Engine on every host', 'GPU hosts', 'Summary']
    assert report['summary'] == {'status': 'drift', 'hosts': 2, 'checked': 2, 'partially_checked': 0,
                                 'not_checked': 0, 'drift': 1, 'errors': 0}
    assert 'No drift.' in host_section(markdown, 'beta')
    assert 'Checked: all 3 plays' in host_section(markdown, 'alpha')
    assert '## ghost' not in markdown and '| ghost |' not in markdown and 'ghost' not in result.stdout
    assert '2 host(s), 2 fully checked (alpha: checked, 1 drift; beta: checked, 0 drift)' in result.stdout


def plays_of(report: dict, host: str) -> list[tuple[str, str]]:
    return [(p['play'], p['status']) for p in report['hosts'][host]['plays']]


def test_a_host_ended_by_meta_end_host_or_rescued_is_checked(project):
    checked = ['Prepare', 'Rollout, one host at a time', 'Summary']
    result = project.check('--limit', 'local', inventory='coverage.ini', playbook='rollout.yml')
    assert result.returncode == 0, result.stdout + result.stderr
    _run_dir, report, _markdown = project.latest()
    assert {h: (c['status'], c['plays_checked']) for h, c in report['hosts'].items()} == {
        'alpha': ('checked', checked), 'beta': ('checked', checked)}

    # A rescued failure is an error (exit 1), but the play ran to its end: the host is checked.
    result = project.check('--limit', 'local', '-e', 'rescue_on=beta', inventory='coverage.ini', playbook='rollout.yml')
    assert result.returncode == 1, result.stdout + result.stderr
    _run_dir, report, _markdown = project.latest()
    assert [(e['host'], e['task']) for e in report['errors']] == [('beta', 'Deploy')]
    assert {h: c['status'] for h, c in report['hosts'].items()} == {'alpha': 'checked', 'beta': 'checked'}
    assert 'not fully checked' not in result.stdout


def test_a_stopped_serial_rollout_leaves_the_next_hosts_unchecked(project):
    result = project.check('--limit', 'local', '-e', 'gate_fails_on=alpha', inventory='coverage.ini',
                           playbook='rollout.yml')
    assert result.returncode == 1, result.stdout + result.stderr
    _run_dir, report, markdown = project.latest()
    assert plays_of(report, 'alpha') == [
        ('Prepare', 'checked'), ('Rollout, one host at a time', 'failed'), ('Summary', 'not run')]
    assert plays_of(report, 'beta') == [
        ('Prepare', 'checked'), ('Rollout, one host at a time', 'not run'), ('Summary', 'not run')]
    beta = {p['play']: p.get('reason') for p in report['hosts']['beta']['plays']}
    assert beta == {'Prepare': None, 'Rollout, one host at a time': "the play stopped before this host's serial batch",
                    'Summary': 'the run stopped before this play'}
    assert report['hosts']['alpha']['plays'][1]['reason'] == 'at task "Health gate"'
    assert {h: c['status'] for h, c in report['hosts'].items()} == {
        'alpha': 'partially checked', 'beta': 'partially checked'}
    assert 'No drift in the plays checked.' in host_section(markdown, 'beta')
    assert 'beta: partially checked (plays checked: "Prepare"), 0 drift' in result.stdout
