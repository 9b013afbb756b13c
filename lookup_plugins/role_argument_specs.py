# -*- coding: utf-8 -*-
"""Lookup: the main options of every role's meta/argument_specs.yml, merged into one spec."""

from __future__ import annotations

DOCUMENTATION = r"""
name: role_argument_specs
short_description: Every role's main options, as one argument spec
description:
  - Reads C(meta/argument_specs.yml) of every role in the given roles directories (default the
    configured C(roles_path)) and returns the options of their C(main) entry points merged into
    one dict, for C(ansible.builtin.validate_argument_spec). site.yml checks every role's
    inputs with it before any host changes, whatever roles the project has.
  - An option two roles both declare must be declared the same way.
options:
  _terms:
    description: Roles directories; none means the configured roles path.
    type: list
    elements: path
    required: false
"""

EXAMPLES = r"""
- name: Check every role's inputs before anything changes
  ansible.builtin.validate_argument_spec:
    argument_spec: "{{ lookup('role_argument_specs') }}"
"""

RETURN = r"""
_raw:
  description: One dict, option name to its spec.
  type: list
  elements: dict
"""

import glob
import os

import yaml
from ansible import constants as C
from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        # The configured roles_path (ansible.cfg: roles), made absolute by Ansible's config.
        dirs = terms or [p for p in C.DEFAULT_ROLES_PATH if os.path.isdir(p)]
        merged, owner = {}, {}
        for roles_dir in dirs:
            for path in sorted(glob.glob(os.path.join(os.path.expanduser(roles_dir), "*", "meta", "argument_specs.yml"))):
                role = os.path.basename(os.path.dirname(os.path.dirname(path)))
                with open(path, encoding="utf-8") as handle:
                    specs = (yaml.safe_load(handle) or {}).get("argument_specs", {})
                for name, spec in ((specs.get("main") or {}).get("options") or {}).items():
                    if name in merged and merged[name] != spec:
                        raise AnsibleLookupError(f"option {name} is declared differently by roles {owner[name]} and {role}")
                    merged[name], owner[name] = spec, role
        return [merged]
