"""docs/api.md is generated from the docstrings (docs/gen_api.py) and must be up to date; every
public name has a docstring."""
import importlib.util
import inspect
from pathlib import Path

import etp_fx

ROOT = Path(__file__).resolve().parent.parent


def gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Public methods/properties allowed to lack a docstring (none now). A new undocumented public
# method fails the test, and so does an entry here that has since been documented.
KNOWN_MISSING: set[str] = set()


def test_api_md_is_up_to_date():
    text = gen_api().render()
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == text, "docs/api.md is out of date: run python docs/gen_api.py"


def test_every_public_name_is_in_the_reference():
    text = (ROOT / "docs" / "api.md").read_text()
    for name in etp_fx.__all__:
        assert f"`etp_fx.{name}`" in text, name


def test_every_public_name_has_its_own_docstring():
    g = gen_api()
    for name in etp_fx.__all__:
        obj = getattr(etp_fx, name)
        assert g.own_doc(obj), f"etp_fx.{name} has no docstring"
        for sub in getattr(obj, "__all__", []) if inspect.ismodule(obj) else []:
            v = getattr(obj, sub)
            if inspect.isclass(v) or inspect.isfunction(v):
                assert g.own_doc(v), f"etp_fx.{name}.{sub} has no docstring"


def test_public_methods_have_docstrings():
    missing = set(gen_api().missing_docstrings())
    new = sorted(missing - KNOWN_MISSING)
    fixed = sorted(KNOWN_MISSING - missing)
    assert not new, f"public callables without a docstring: {new}"
    assert not fixed, f"now documented, remove from KNOWN_MISSING: {fixed}"
