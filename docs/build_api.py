"""Write docs/api.md, the API reference, from the docstrings of fastlaplace's public API.

    python docs/build_api.py            # from the repository root: (re)writes docs/api.md
    python docs/build_api.py --check    # exit status 1 if docs/api.md is stale

A module's public names are its ``__all__`` (or else the classes and functions it defines
without a leading underscore); a name documented in another module of
``MODULES`` is a link there. Only the standard library: no documentation tool to install.
``tests/test_docs.py`` fails when the committed docs/api.md differs from what this writes.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
COMMAND = "python docs/build_api.py"

# The modules a user imports, in reading order; a new public module is one more line.
MODULES = [
    "fastlaplace",
    "fastlaplace.ops",
    "fastlaplace.reference",
    "fastlaplace.options",
    "fastlaplace.datasets",
    "fastlaplace.methods",
    "fastlaplace.prior",
    "fastlaplace.posterior",
    "fastlaplace.calibration",
    "fastlaplace.theory",
    "fastlaplace.data",
    "fastlaplace.distributed",
]

# Google-style section headers whose indented entries become a list.
SECTIONS = {"Args", "Arguments", "Returns", "Raises", "Yields", "Attributes", "Shapes", "Note", "Notes"}
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading (before de-duplication)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def inline(text: str) -> str:
    """reST inline markup as Markdown: ``x`` and :role:`x` become `x`."""
    return ROLE.sub(r"`\1`", text.replace("``", "`"))


def render_doc(doc: str | None) -> list[str]:
    """A docstring as Markdown: prose as paragraphs, Args/Returns/... as lists, other
    indented blocks (examples, formulas) as fenced text."""
    if not doc:
        return ["*(no docstring)*", ""]
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        after = block_end(lines, i + 1, blank_only=True)
        if line.startswith(" "):  # an indented block after prose: keep it as written
            j = block_end(lines, i)
            out += fenced(lines[i:j])
        elif line.rstrip().endswith(":") and after < len(lines) and lines[after].startswith(" "):
            j = block_end(lines, i + 1)
            header = line.rstrip()
            if header[:-1] in SECTIONS:
                out += [f"**{header[:-1]}**", "", *entries(lines[i + 1:j]), ""]
            else:  # prose introducing a formula or an example (reST's "::" included)
                out += [inline(header.removesuffix(":") if header.endswith("::") else header), "",
                        *fenced(lines[i + 1:j])]
        elif re.match(r"[-*] |\d+\. ", line):  # a list item: its indented lines continue it
            j = i + 1
            while j < len(lines) and lines[j].startswith(" ") and lines[j].strip():
                j += 1
            out.append(inline(" ".join(x.strip() for x in lines[i:j])))
        else:
            j = i + 1
            out.append(inline(line))
        i = j
    return [*out, ""]


def block_end(lines: list[str], j: int, blank_only: bool = False) -> int:
    """The index after the blank (and, unless ``blank_only``, indented) lines from ``j``."""
    while j < len(lines) and (not lines[j].strip() or (not blank_only and lines[j].startswith(" "))):
        j += 1
    return j


def fenced(block: list[str]) -> list[str]:
    return ["```text", *inspect.cleandoc("\n".join(block)).strip("\n").splitlines(), "```", ""]


def entries(block: list[str]) -> list[str]:
    """Indented ``name: text`` entries (continued on deeper lines) as a Markdown list."""
    base = min(len(b) - len(b.lstrip()) for b in block if b.strip())
    items: list[str] = []
    for b in filter(str.strip, block):
        name, sep, rest = b.strip().partition(": ")
        if len(b) - len(b.lstrip()) == base and sep and re.fullmatch(r"[\w*, ]+", name):
            items.append(f"- `{name}`: {inline(rest)}")
        elif items:
            items[-1] += " " + inline(b.strip())
        else:
            items.append(f"- {inline(b.strip())}")
    return items


class _Shown:
    """A default value as it reads in source, without memory addresses."""

    def __init__(self, value: object):
        self.value = value

    def __repr__(self) -> str:
        v = self.value
        if isinstance(v, enum.Enum):
            return f"{type(v).__name__}.{v.name}"
        if inspect.isclass(v):
            return v.__qualname__
        if isinstance(v, tuple):
            return "(" + ", ".join(repr(_Shown(x)) for x in v) + ("," if len(v) == 1 else "") + ")"
        return ADDRESS.sub("", repr(v))


class _Source(str):
    """A string annotation (``from __future__ import annotations``) shown unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _annotation(a: object) -> object:
    return _Source(a) if isinstance(a, str) else a


def signature(obj: object) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = []
    for p in sig.parameters.values():
        p = p.replace(annotation=_annotation(p.annotation))
        params.append(p.replace(default=_Shown(p.default)) if p.default is not p.empty else p)
    return str(sig.replace(parameters=params, return_annotation=_annotation(sig.return_annotation)))


def home(obj: object) -> str | None:
    """The documented module that owns ``obj``, if any."""
    module = getattr(obj, "__module__", None)
    return module if module in MODULES else None


def public_names(module) -> list[str]:
    """``__all__``, or else the classes and functions the module defines without a leading underscore."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    defined = [n for n, v in vars(module).items() if (inspect.isclass(v) or inspect.isfunction(v))
               and v.__module__ == module.__name__]
    return [n for n in defined if not n.startswith("_")]


def members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined by the class itself (not by torch's bases)."""
    found = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property) or inspect.isfunction(value):
            found.append((name, value))
    return found


def render_class(qualified: str, cls: type) -> list[str]:
    out = [f"### {qualified}", ""]
    if issubclass(cls, enum.Enum):
        out += [f"`class {cls.__name__}` (enum): " + ", ".join(f"`{m.name} = {m.value!r}`" for m in cls), ""]
    else:
        sig = signature(cls)
        out += ["```python", f"class {cls.__name__}{sig if sig is not None else ''}", "```", ""]
    bases = [b for b in cls.__bases__ if link_target(b)]
    if bases:
        out += ["Subclass of " + ", ".join(f"[`{b.__name__}`](#{slug(link_target(b))})" for b in bases) + ".", ""]
    out += render_doc(cls.__doc__)
    for name, value in members(cls):
        out += [f"#### {cls.__name__}.{name}", ""]
        if isinstance(value, property):
            out += ["*property*", "", *render_doc(value.fget.__doc__ if value.fget else None)]
        else:
            out += ["```python", f"{name}{signature(value)}", "```", "", *render_doc(value.__doc__)]
    return out


def link_target(obj: object) -> str | None:
    """The heading under which ``obj`` is documented in full: in its own module if that is
    documented, else in the first documented module that exports it."""
    if home(obj):
        return f"{home(obj)}.{obj.__name__}"
    for name in MODULES:
        module = importlib.import_module(name)
        exported = [n for n in public_names(module) if getattr(module, n) is obj]
        if exported:
            return f"{name}.{exported[0]}"
    return None


def render_module(name: str) -> list[str]:
    module = importlib.import_module(name)
    out = [f"## {name}", "", *render_doc(module.__doc__)]
    for public in public_names(module):
        obj = getattr(module, public)
        if inspect.ismodule(obj):
            if obj.__name__ in MODULES:
                out += [f"- `{public}`: the module [`{obj.__name__}`](#{slug(obj.__name__)})", ""]
            continue
        owner = home(obj)
        if owner and owner != name and (inspect.isclass(obj) or inspect.isfunction(obj)):
            out += [f"- `{public}`: see [`{link_target(obj)}`](#{slug(link_target(obj))})", ""]
        elif inspect.isclass(obj):
            out += render_class(f"{name}.{public}", obj)
        elif callable(obj):
            out += [f"### {name}.{public}", "", "```python", f"{public}{signature(obj) or '(...)'}", "```", "",
                    *render_doc(obj.__doc__)]
        else:
            out += [f"### {name}.{public}", "", f"`{public} = {_Shown(obj)!r}`", ""]
    return out


def render() -> str:
    lines = [
        "# API reference",
        "",
        f"Generated from the docstrings by `{COMMAND}` (from the repository root); do not edit by hand.",
        "The guide with examples is [guide.md](guide.md); the math the docstrings cite as",
        "`docs/design.md §N` is [design.md](design.md).",
        "",
    ]
    lines += [f"- [{m}](#{slug(m)})" for m in MODULES] + [""]
    for name in MODULES:
        lines += render_module(name)
    while lines and not lines[-1]:
        lines.pop()
    text = "\n".join(line.rstrip() for line in lines) + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/api.md is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"error: {OUT.relative_to(ROOT)} is stale: run `{COMMAND}` from the repository root", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the checkout's fastlaplace, as `python -m` from the root imports it
    sys.exit(main())
