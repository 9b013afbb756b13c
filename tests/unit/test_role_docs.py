"""Role documentation stays true: READMEs match the argument specs, specs and defaults agree.

Every role default is also the `default:` of the main entry point's option in
meta/argument_specs.yml, so `ansible-doc -t role` shows it. Role argument validation never sets
a spec default (the value always comes from defaults/main.yml), so the two must simply never
disagree: the same YAML value, and for a Jinja-templated default the same template string.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (PROJECT / "roles").iterdir() if (p / "meta" / "argument_specs.yml").exists())


def role_defaults(role):
    path = PROJECT / "roles" / role / "defaults" / "main.yml"
    return (yaml.safe_load(path.read_text()) if path.exists() else None) or {}


def main_options(role):
    spec = yaml.safe_load((PROJECT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    return spec["argument_specs"]["main"]["options"]


def test_role_readmes_match_the_argument_specs():
    result = subprocess.run([sys.executable, str(PROJECT / "scripts" / "role-docs"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_in_the_argument_spec(role):
    assert set(role_defaults(role)) - set(main_options(role)) == set()


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_the_spec_default(role):
    options = main_options(role)
    missing = sorted(name for name in role_defaults(role) if "default" not in options.get(name, {}))
    assert missing == [], f"options without a spec default: {missing}"
    # Equal and of the same type (True == 1 and 1 == 1.0 in Python; not in the docs).
    differ = {name: (options[name]["default"], value) for name, value in role_defaults(role).items()
              if options[name]["default"] != value or type(options[name]["default"]) is not type(value)}
    assert differ == {}, "spec default != defaults/main.yml: " + repr(differ)


@pytest.mark.parametrize("role", ROLES)
def test_every_spec_default_is_a_role_default(role):
    defaults = role_defaults(role)
    stray = sorted(name for name, spec in main_options(role).items() if "default" in spec and name not in defaults)
    assert stray == [], f"spec defaults that defaults/main.yml does not set: {stray}"


@pytest.mark.parametrize("role", ROLES)
def test_required_options_have_no_default(role):
    both = sorted(name for name, spec in main_options(role).items() if spec.get("required") and "default" in spec)
    assert both == [] and not set(both) & set(role_defaults(role))


def test_role_docs_reports_a_disagreement(tmp_path):
    """scripts/role-docs fails, even without --check, when a spec default drifts from the role's."""
    role = tmp_path / "roles" / "demo"
    (role / "meta").mkdir(parents=True)
    (role / "defaults").mkdir()
    (role / "defaults" / "main.yml").write_text('---\ndemo_name: "{{ inventory_hostname }}"\ndemo_count: 1\n')
    (role / "meta" / "argument_specs.yml").write_text(
        "---\nargument_specs:\n  main:\n    options:\n"
        "      demo_name: {type: str, default: \"{{ inventory_hostname }}\"}\n"
        "      demo_count: {type: int, default: 2}\n"
        "      demo_extra: {type: bool, default: false}\n")
    script = tmp_path / "scripts" / "role-docs"
    script.parent.mkdir()
    script.write_text((PROJECT / "scripts" / "role-docs").read_text())
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "demo_count: spec default 2 != 1" in result.stderr
    assert "demo_extra: spec default False, not in defaults/main.yml" in result.stderr
    assert "demo_name" not in result.stderr
