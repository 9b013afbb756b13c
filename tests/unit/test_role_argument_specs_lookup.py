"""lookup_plugins/role_argument_specs.py: every role's main options as one spec (site.yml's input check)."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleLookupError

PROJECT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("role_argument_specs", PROJECT / "lookup_plugins" / "role_argument_specs.py")
plugin = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(plugin)


def lookup(*dirs):
    return plugin.LookupModule().run([str(d) for d in dirs])[0]


def test_every_roles_main_options_are_merged():
    merged = lookup(PROJECT / "roles")
    for spec_file in (PROJECT / "roles").glob("*/meta/argument_specs.yml"):
        options = yaml.safe_load(spec_file.read_text())["argument_specs"]["main"]["options"]
        assert {name: merged[name] for name in options} == options, spec_file


def test_a_new_role_is_read_without_editing_site_yml(tmp_path):
    (tmp_path / "new_role" / "meta").mkdir(parents=True)
    (tmp_path / "new_role" / "meta" / "argument_specs.yml").write_text(
        "argument_specs:\n  main:\n    options:\n      new_role_port: {type: int, default: 1}\n")
    assert lookup(tmp_path) == {"new_role_port": {"type": "int", "default": 1}}


def test_an_option_two_roles_declare_differently_is_an_error(tmp_path):
    for role, kind in (("a", "int"), ("b", "str")):
        (tmp_path / role / "meta").mkdir(parents=True)
        (tmp_path / role / "meta" / "argument_specs.yml").write_text(
            f"argument_specs:\n  main:\n    options:\n      shared_name: {{type: {kind}}}\n")
    with pytest.raises(AnsibleLookupError, match="shared_name is declared differently by roles a and b"):
        lookup(tmp_path)
