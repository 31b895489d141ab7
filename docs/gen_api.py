"""Generate ``docs/api.md``, the API reference, from the docstrings of ``etp_fx.__all__``.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date

Sections follow the comments of ``__all__`` in ``etp_fx/__init__.py``. For every public name:
its signature, the summary line, the parameters (a table from the numpy-style ``Parameters``
section, with defaults from the signature), the rest of the docstring, and for a class its
public methods and properties; for a module, every name of the module's own ``__all__``.
``tests/test_api_docs.py`` checks that the file is up to date.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TABLE_SECTIONS = {"Parameters", "Other Parameters", "Attributes"}
LIST_SECTIONS = {"Returns", "Yields", "Raises", "Warns"}
CODE_SECTIONS = {"Examples"}


# --- reading the package ----------------------------------------------------------------------

def sections_of_all() -> list[tuple[str, list[str]]]:
    """``(section title, names)`` from the comments inside ``__all__`` of etp_fx/__init__.py."""
    import etp_fx
    src = (ROOT / "etp_fx" / "__init__.py").read_text()
    m = re.search(r"__all__\s*=\s*\[(.*?)\]", src, flags=re.S)
    out: list[tuple[str, list[str]]] = []
    if m:
        for line in m.group(1).splitlines():
            line = line.strip()
            if line.startswith("#"):
                out.append((line.lstrip("# ").strip().capitalize(), []))
                continue
            names = re.findall(r"['\"]([A-Za-z_][A-Za-z0-9_]*)['\"]", line)
            if names and not out:
                out.append(("Public API", []))
            if names:
                out[-1][1].extend(names)
    listed = [n for _, ns in out for n in ns]
    missing = [n for n in etp_fx.__all__ if n not in listed]
    if missing:
        out.append(("Other", missing))
    return [(t, ns) for t, ns in out if ns]


def own_doc(obj: Any) -> str:
    """The object's own docstring (not one inherited from a base class), dedented."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
    elif isinstance(obj, property):
        doc = obj.fget.__doc__ if obj.fget else None
    else:
        doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else ""


def public_members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties (and ``__call__``) of ``cls``, including those it inherits
    from etp_fx base classes (private ones too, e.g. the regularisers' shared base)."""
    return [(n, v) for n, v, _ in members_with_owner(cls)]


def members_with_owner(cls: type) -> list[tuple[str, Any, type]]:
    """``(name, member, defining class)`` for the public members of ``cls`` (see above)."""
    out, seen = [], set()
    own = [c for c in cls.__mro__ if c.__module__.startswith("etp_fx")]
    for owner, name, v in [(c, n, v) for c in own for n, v in vars(c).items()]:
        if name in seen or (name.startswith("_") and name != "__call__"):
            continue
        seen.add(name)
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if inspect.isfunction(v) or isinstance(v, property):
            out.append((name, v, owner))
    return out


def _clean_default(s: str) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", s)


def _ann(a: Any) -> str:
    if isinstance(a, str):  # a string annotation; a forward reference keeps its quotes
        return a[1:-1] if len(a) > 1 and a[0] == a[-1] and a[0] in "'\"" else a
    return inspect.formatannotation(a)


def _param(p: inspect.Parameter) -> str:
    """One parameter as written in code: annotations unquoted (they are strings under
    ``from __future__ import annotations``)."""
    star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    s = star + p.name
    if p.annotation is not inspect.Parameter.empty:
        s += f": {_ann(p.annotation)}"
    if p.default is not inspect.Parameter.empty:
        eq = " = " if p.annotation is not inspect.Parameter.empty else "="
        s += eq + _clean_default(repr(p.default))
    return s


def signature(obj: Any, name: str, *, drop_self: bool = False) -> str | None:
    """``name(params) -> ret`` with private parameters hidden; wrapped when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values() if not p.name.startswith("_")]
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    parts, seen_kwonly = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not seen_kwonly:
            parts.append("*")
            seen_kwonly = True
        if p.kind is p.VAR_POSITIONAL:
            seen_kwonly = True
        parts.append(_param(p))
    ret = ""
    if sig.return_annotation is not inspect.Signature.empty and not inspect.isclass(obj):
        ret = f" -> {_ann(sig.return_annotation)}"
    one = f"{name}({', '.join(parts)}){ret}"
    if len(one) <= 92:
        return one
    return f"{name}(\n" + "".join(f"    {p},\n" for p in parts) + f"){ret}"


# --- docstring parsing (numpy style, tolerant) --------------------------------------------------

def split_sections(doc: str) -> tuple[str, list[tuple[str, str]]]:
    """``(text before the first section, [(section title, body)])``."""
    lines = doc.splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and re.fullmatch(r"-{3,}", lines[i + 1].strip())
             and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 1]
    if not heads:
        return doc, []
    pre = "\n".join(lines[: heads[0]])
    out = []
    for k, h in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        out.append((lines[h].strip(), textwrap.dedent("\n".join(lines[h + 2: end])).strip("\n")))
    return pre, out


def entries(body: str) -> list[tuple[str, str, str]]:
    """``(names, type, description)`` entries of a Parameters-like section."""
    out: list[list[str]] = []
    for line in body.splitlines():
        if line and not line[0].isspace():
            name, _, typ = line.partition(" : ")
            out.append([name.strip(), typ.strip(), ""])
        elif out:
            out[-1][2] += " " + line.strip()
    return [(n, t, " ".join(d.split())) for n, t, d in out]


def inline(text: str) -> str:
    """reST roles to Markdown code spans: :func:`etp_fx.trace` -> ``etp_fx.trace``."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"``\1``", text)


def cell(text: str) -> str:
    return inline(text).replace("|", "\\|")


def prose(text: str) -> str:
    """Docstring prose to Markdown: ``::`` literal blocks and ``>>>`` lines become fenced code."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip() if lines[i].lstrip().startswith((">>>", "..."))
                             else lines[i])
                i += 1
            out += ["```pycon", *textwrap.dedent("\n".join(block)).splitlines(), "```"]
            continue
        if line.rstrip().endswith("::"):
            if line.strip() != "::":
                out.append(inline(line.rstrip()[:-1]))
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```python", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""]
            continue
        out.append(inline(line))
        i += 1
    return "\n".join(out).strip("\n")


def summary_and_rest(pre: str) -> tuple[str, str]:
    paras = re.split(r"\n\s*\n", pre.strip(), maxsplit=1)
    summary = " ".join(paras[0].split()) if paras and paras[0] else ""
    return summary, paras[1] if len(paras) > 1 else ""


# --- rendering ----------------------------------------------------------------------------------

def param_table(obj: Any, section_entries: list[tuple[str, str, str]]) -> list[str]:
    defaults = {}
    try:
        for p in inspect.signature(obj).parameters.values():
            if p.default is not inspect.Parameter.empty:
                defaults[p.name] = _clean_default(repr(p.default))
    except (TypeError, ValueError):
        pass
    rows = ["| name | type | default | description |", "|---|---|---|---|"]
    for names, typ, desc in section_entries:
        d = defaults.get(names, "") if "," not in names else ""
        rows.append(f"| `{names}` | {cell(typ)} | {('`' + cell(d) + '`') if d else ''} | "
                    f"{cell(desc)} |")
    return rows


def render_doc(obj: Any, doc: str) -> list[str]:
    """Summary, parameters and the rest of a docstring as Markdown lines."""
    if not doc:
        return ["*No docstring.*", ""]
    pre, sections = split_sections(doc)
    summary, rest = summary_and_rest(pre)
    if summary.endswith("::"):  # the summary introduces a code block
        summary, rest = summary[:-1], "::\n" + rest
    out = [inline(summary), ""]
    if rest.strip():
        out += [prose(rest), ""]
    for title, body in sections:
        if title in TABLE_SECTIONS:
            out += [f"**{title}**", "", *param_table(obj, entries(body)), ""]
        elif title in LIST_SECTIONS:
            out += [f"**{title}**", ""]
            for names, typ, desc in entries(body):
                head = f"`{names}`" + (f" ({inline(typ)})" if typ else "")
                out.append(f"- {head}" + (f": {inline(desc)}" if desc else ""))
            out.append("")
        elif title in CODE_SECTIONS:
            out += [f"**{title}**", "", prose(body), ""]
        else:
            out += [f"**{title}**", "", prose(body), ""]
    return out


def anchor(text: str) -> str:
    """GitHub's heading anchor for a heading text."""
    a = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
    return a


def method_doc(cls: type, name: str, m: Any) -> str:
    """A method's docstring, or the one of the method it overrides in a base class."""
    for c in cls.__mro__:
        v = c.__dict__.get(name)
        if v is not None:
            d = own_doc(v.__func__ if isinstance(v, (staticmethod, classmethod)) else v)
            if d:
                return d
    return ""


def render_callable(obj: Any, qualname: str, level: str, *, drop_self: bool = False,
                    kind: str = "", doc: str | None = None) -> list[str]:
    out = [f"{level} {kind}`{qualname}`", ""]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        bases = ", ".join(b.__name__ for b in obj.__bases__)
        out += ["```python", f"class {obj.__name__}({bases})", "```", ""]
    else:
        sig = signature(obj, qualname.rsplit(".", 1)[-1], drop_self=drop_self)
        if sig:
            out += ["```python", sig, "```", ""]
    return out + render_doc(obj, own_doc(obj) if doc is None else doc)


def render_class(cls: type, qualname: str, level: str) -> list[str]:
    out = render_callable(cls, qualname, level, kind="class ")
    members = public_members(cls)
    for name, m in members:
        if isinstance(m, property):
            doc = method_doc(cls, name, m)
            out += [f"- **property** `{name}`: " + (inline(summary_and_rest(
                split_sections(doc)[0])[0]) if doc else "*no docstring*")]
            continue
    if any(isinstance(m, property) for _, m in members):
        out.append("")
    inherited: dict[str, list[str]] = {}
    for name, m, owner in members_with_owner(cls):
        if owner is not cls and not owner.__name__.startswith("_") and \
                not isinstance(m, property):
            inherited.setdefault(owner.__name__, []).append(name)
    for owner, names in inherited.items():
        out += [f"Inherited from `{owner}`: " + ", ".join(f"`{n}`" for n in names), ""]
    skip = {n for ns in inherited.values() for n in ns}
    for name, m in members:
        if isinstance(m, property) or name in skip:
            continue
        out += render_callable(m, f"{cls.__name__}.{name}", level + "#", drop_self=True,
                               doc=method_doc(cls, name, m))
    return out


def render_data(obj: Any, qualname: str, level: str) -> list[str]:
    if isinstance(obj, dict):
        keys = ", ".join(f"`{k}`" for k in obj)
        return [f"{level} `{qualname}`", "", f"A `dict` with the keys {keys}.", ""]
    return [f"{level} `{qualname}`", "", f"`{type(obj).__name__}`: `{obj!r}`", ""]


def render_name(name: str, obj: Any, level: str, top: dict[int, str], prefix: str) -> list[str]:
    qual = f"{prefix}.{name}"
    if id(obj) in top and top[id(obj)] != qual:
        target = top[id(obj)]
        link = anchor(heading_text(obj, target.split(".", 1)[1]))
        return [f"- `{qual}`: the same object as [`{target}`](#{link})"]
    if inspect.isclass(obj):
        return render_class(obj, qual, level)
    if callable(obj):
        return render_callable(obj, qual, level)
    return render_data(obj, qual, level)


def render_module(mod: Any, qualname: str, top: dict[int, str]) -> list[str]:
    out = [f"### module `{qualname}`", ""]
    out += render_doc(mod, own_doc(mod))
    links, bodies = [], []
    for name in getattr(mod, "__all__", []):
        lines = render_name(name, getattr(mod, name), "####", top, qualname)
        (links if len(lines) == 1 else bodies).append(lines)
    for lines in links:
        out += lines
    if links:
        out.append("")
    for lines in bodies:
        out += lines
    return out


def render() -> str:
    """The whole of docs/api.md as a string."""
    import etp_fx
    sections = sections_of_all()
    top = {}
    for name in etp_fx.__all__:
        obj = getattr(etp_fx, name)
        if not inspect.ismodule(obj):
            top.setdefault(id(obj), f"etp_fx.{name}")
    out = ["<!-- Generated by docs/gen_api.py from the docstrings: do not edit by hand. "
           "Run `python docs/gen_api.py` after changing a public docstring. -->", "",
           "# API reference", "",
           f"Every public name of `etp_fx` (`etp_fx.__all__`, version {etp_fx.__version__}), "
           "grouped as in `etp_fx/__init__.py`. Guides: [concepts](concepts.md), "
           "[guides](guides.md), [the ETP method](etp.md), [examples](../examples/README.md).",
           ""]
    for title, names in sections:
        out.append(f"- **{title}**: " + ", ".join(
            f"[`{n}`](#{anchor(heading_text(getattr(etp_fx, n), n))})" for n in names))
    out.append("")
    for title, names in sections:
        out += [f"## {title}", ""]
        for name in names:
            obj = getattr(etp_fx, name)
            if inspect.ismodule(obj):
                out += render_module(obj, f"etp_fx.{name}", top)
            elif inspect.isclass(obj):
                out += render_class(obj, f"etp_fx.{name}", "###")
            else:
                out += render_callable(obj, f"etp_fx.{name}", "###")
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    return text


def heading_text(obj: Any, name: str) -> str:
    if inspect.ismodule(obj):
        return f"module etp_fx.{name}"
    if inspect.isclass(obj):
        return f"class etp_fx.{name}"
    return f"etp_fx.{name}"


def missing_docstrings() -> list[str]:
    """Public names, and public methods or properties of public classes, without a docstring
    (a method that overrides a documented one counts as documented)."""
    import etp_fx
    out: list[str] = []
    seen: set[int] = set()

    def visit(obj: Any, qual: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if not own_doc(obj):
            out.append(qual)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for name, m in public_members(obj):
                if not method_doc(obj, name, m):
                    out.append(f"{qual}.{name}")

    names = sorted(etp_fx.__all__, key=lambda n: inspect.ismodule(getattr(etp_fx, n)))
    for name in names:  # top-level names first: their module aliases are skipped
        obj = getattr(etp_fx, name)
        if inspect.ismodule(obj):
            if not own_doc(obj):
                out.append(f"etp_fx.{name}")
            for sub in getattr(obj, "__all__", []):
                v = getattr(obj, sub)
                if inspect.isclass(v) or inspect.isfunction(v):
                    visit(v, f"etp_fx.{name}.{sub}")
        else:
            visit(obj, f"etp_fx.{name}")
    return sorted(set(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    p.add_argument("--missing", action="store_true", help="list public names without a docstring")
    args = p.parse_args(argv)
    if args.missing:
        print("\n".join(missing_docstrings()))
        return 0
    text = render()
    if args.check:
        ok = OUT.is_file() and OUT.read_text() == text
        print("docs/api.md is up to date" if ok else "docs/api.md is out of date: run "
              "python docs/gen_api.py")
        return 0 if ok else 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
