# -*- coding: utf-8 -*-
"""Every module in library/ documents itself: `ansible-doc` shows its options, examples and returns."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import LIBRARY_DIR, REPO_ROOT

MODULES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(LIBRARY_DIR, '*.py')))


@pytest.mark.parametrize('name', MODULES)
def test_ansible_doc_shows_the_module(name):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO_ROOT, 'ansible.cfg'))
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'ansible-doc'), '--json', name],
                            cwd=REPO_ROOT, env=env, text=True, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)[name]
    assert doc['doc']['options'] and doc['doc']['short_description']
    assert doc['examples'].strip()
    assert doc['return']
