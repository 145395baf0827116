"""mkdocs hooks of the documentation site (``mkdocs.yml`` names this file; ``make docs`` runs them).

What they do during every build, so that the generated parts cannot fall behind the code:

* ``<!-- generated: method-table -->`` in a page becomes the method registry's table
  (:func:`tnt_lightning.engine.registry.method_table`), each method linked to its page;
* ``<!-- generated: config-groups -->`` becomes one section per config group of ``conf/``: every
  option file, its header comment, and a table of its keys with their defaults and comments;
* ``<!-- generated: identity-table -->`` becomes ``results/identity.py``'s ``OUTCOME_TABLE``;
* a results page's generated sections (``<!-- results: ... -->``) must equal what
  ``python -m tnt_lightning.report.pages`` makes of their data, or the build fails;
* the API reference (``docs/api.md``, mkdocstrings) shows a docstring's Sphinx role
  (``:func:`~.flops.token_trace```) as the name it points to;
* every registered method is in the nav, and one without a hand-written ``docs/methods/<name>.md``
  gets a page made from its module's docstring and its registration (a new method is one module
  and one YAML, its docs page included);
* the build fails when a ``docs/<page>.md#<anchor>`` pointer in the code, configs, sweeps, tests,
  scripts or README names a page or heading this site does not have (the pointers cannot rot);
  in the generated configuration reference, such a pointer in a config comment is a link.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "src"))

# Where pointers to the site's pages are looked for (tracked files only).
POINTER_PLACES = ("src", "conf", "sweeps", "tests", "scripts", "examples", "README.md", "Makefile")
POINTER = re.compile(r"docs/(?P<page>[\w/-]+\.md)(?:#(?P<anchor>[\w-]+))?")
# Groups shown as a list of files with their header comment only (their files set many groups at once).
HEADER_ONLY = {"sweep", "experiment", "hydra"}
# Display order of the groups; any group not named here follows, alphabetically.
GROUP_ORDER = [
    "model",
    "method",
    "schedule",
    "data",
    "trainer",
    "logger",
    "measure",
    "visualize",
    "paths",
    "hydra/launcher",
    "hydra",
    "experiment",
    "sweep",
]
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")


# --------------------------------------------------------------------------------- config groups
def _split_comment(rest: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def parse_yaml_options(path: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """(header comment, [(dotted key, default, comment)]) of one config file, read line by line."""
    lines = path.read_text().splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        text = lines[i].lstrip("#").strip()
        if text and not text.startswith("@package"):
            header.append(text)
        i += 1
    rows: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    in_defaults = False
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = KEY_LINE.match(line)
        if not m:  # list items and continued values
            pending = []
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m["key"]])
        value, comment = _split_comment(m["rest"])
        if indent == 0:
            in_defaults = m["key"] == "defaults"
        if in_defaults:
            pending = []
            continue
        if value in ("", "|", ">"):
            stack.append((indent, m["key"]))
            if value == "":
                if comment or pending:
                    rows.append((key, "", " ".join(pending + ([comment] if comment else []))))
                pending = []
                continue
        rows.append((key, value, " ".join(pending + ([comment] if comment else []))))
        pending = []
    return " ".join(header), rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _link_pointers(text: str, page_depth: int) -> str:
    """Turn ``docs/<page>.md#<anchor>`` in a config comment into a link to that page of the site."""
    prefix = "../" * page_depth

    def repl(m: re.Match) -> str:
        anchor = f"#{m['anchor']}" if m["anchor"] else ""
        return f"[{m[0]}]({prefix}{m['page']}{anchor})"

    return POINTER.sub(repl, text)


def _group_dirs() -> list[str]:
    groups = []
    for folder, _, names in sorted(os.walk(CONF, followlinks=True)):  # conf/sweep links to sweeps/
        rel = Path(folder).relative_to(CONF).as_posix()
        if rel != "." and any(n.endswith(".yaml") for n in names) and rel not in groups:
            groups.append(rel)
    known = [g for g in GROUP_ORDER if g in groups]
    return known + sorted(g for g in groups if g not in known)


def config_groups_markdown(page_depth: int) -> str:
    out: list[str] = []
    top_header, top_rows = parse_yaml_options(CONF / "config.yaml")
    out += [
        "## Top-level keys {#top-level-keys}",
        "",
        f"`conf/config.yaml`: {_cell(top_header)}",
        "",
        "| key | default | what |",
        "|---|---|---|",
    ]
    out += [f"| `{k}` | `{_cell(v)}` | {_cell(c)} |" for k, v, c in top_rows]
    out.append("")
    for group in _group_dirs():
        files = sorted((CONF / group).glob("*.yaml"))
        anchor = group.replace("/", "-")
        out += [
            f"## `{group}` {{#group-{anchor}}}",
            "",
            f"Options: {', '.join(f'`{f.stem}`' for f in files)}. "
            f"Pick one with `{group}=<option>`; set a key with `{group.split('/')[0]}.<key>=<value>`"
            if group not in HEADER_ONLY and "/" not in group
            else f"Options: {', '.join(f'`{f.stem}`' for f in files)}.",
            "",
        ]
        for f in files:
            header, rows = parse_yaml_options(f)
            rel = f.relative_to(ROOT).as_posix() if not f.is_symlink() else f"conf/{group}/{f.name}"
            out += [
                f"### `{group}={f.stem}` {{#{anchor}-{f.stem.replace('_', '-')}}}",
                "",
                f"`{rel}`" + (f": {_cell(header)}" if header else ""),
                "",
            ]
            if group in HEADER_ONLY or not rows:
                continue
            out += ["| key | default | what |", "|---|---|---|"]
            out += [
                f"| `{k}` | `{_cell(v)}` | {_cell(c)} |" if v else f"| `{k}` | | {_cell(c)} |"
                for k, v, c in rows
            ]
            out.append("")
    return _link_pointers("\n".join(out), page_depth)


# --------------------------------------------------------------------------------- registry tables
def method_table_markdown() -> str:
    from tnt_lightning.engine.registry import TABLE_COLUMNS, method_table

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in method_table():
        cells = [f"[`{row['method']}`]({row['method']}.md)"] + [_cell(row[c]) for c in TABLE_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def identity_table_markdown() -> str:
    from tnt_lightning.results.identity import OUTCOME_TABLE

    yes = {True: "yes", False: "-"}
    lines = ["| fact | experiment key | backbone weights | trained method | why |", "|---|---|---|---|---|"]
    for fact, d in OUTCOME_TABLE.items():
        lines.append(
            f"| `{fact}` | {yes[d.experiment]} | {yes[d.weights]} | {yes[d.trained]} | {_cell(d.why)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- mkdocs events
_anchors: dict[str, set[str]] = {}
# Pages other work adds: in the nav (after the page named) once the file exists; until then a link
# to one is shown as its text and path.
OPTIONAL_PAGES = {
    "speed.md": ("Speed", "measuring.md"),
    "data_cache.md": ("Decoded evaluation cache", "speed.md"),
}


def on_config(config):
    for page, (title, after) in OPTIONAL_PAGES.items():
        if (DOCS / page).exists() and not any(page in str(item) for item in config.nav):
            at = next((i for i, item in enumerate(config.nav) if after in str(item)), len(config.nav) - 1)
            config.nav.insert(at + 1, {title: page})
    _add_methods_to_nav(config.nav)
    return config


def _add_methods_to_nav(nav: list) -> None:
    """Every registered method in the Methods section, after the last method listed: a new method
    needs no nav line (nor a page, see :func:`on_files`)."""
    from tnt_lightning.engine.registry import methods

    section = next(item["Methods"] for item in nav if isinstance(item, dict) and "Methods" in item)
    listed = {page for entry in section for page in entry.values()}
    last = max(
        i for i, entry in enumerate(section) if any(str(v).startswith("methods/") for v in entry.values())
    )
    for info in methods():
        page = f"methods/{info.name}.md"
        if page not in listed:
            last += 1
            section.insert(last, {info.cls.__name__: page})


def _generated_page(name: str) -> str:
    """A method's page from its registration and its module's docstring, for a method whose author
    wrote none (``docs/methods/<name>.md`` replaces it)."""
    from tnt_lightning.engine.registry import TABLE_COLUMNS, get_method, method_table

    info = get_method(name)
    row = next(r for r in method_table() if r["method"] == name)
    table = ["| " + " | ".join(TABLE_COLUMNS[1:]) + " |", "|" + "---|" * (len(TABLE_COLUMNS) - 1)]
    table.append("| " + " | ".join(_cell(row[c]) for c in TABLE_COLUMNS[1:]) + " |")
    doc = sys.modules[info.cls.__module__].__doc__ or ""
    return "\n".join(
        [
            f"# {info.cls.__name__} (`method={name}`)",
            "",
            *table,
            "",
            doc.strip(),
            "",
            f"*This page is made from `{info.cls.__module__}`'s docstring and registration; a hand-written "
            f"`docs/methods/{name}.md` replaces it.*",
        ]
    )


def on_files(files, config):
    from mkdocs.structure.files import File

    from tnt_lightning.engine.registry import method_names

    pages = {f.src_uri for f in files.documentation_pages()}
    for name in method_names():
        if f"methods/{name}.md" not in pages:
            files.append(File.generated(config, f"methods/{name}.md", content=_generated_page(name)))
    _anchors.clear()
    return files


def on_page_markdown(markdown, page, config, files):
    if "<!-- results: " in markdown:
        from tnt_lightning.report.pages import refresh

        if refresh(markdown, DOCS) != markdown:
            raise PluginError(
                f"docs/{page.file.src_uri}: a generated results section differs from its data "
                "(a hand edit?); `python -m tnt_lightning.report.pages` rewrites it"
            )
    depth = page.file.src_uri.count("/")
    for optional in OPTIONAL_PAGES:
        if not (DOCS / optional).exists():
            markdown = re.sub(
                rf"\[([^\]]+)\]\((?:\.\./)*{re.escape(optional)}(#[^)]*)?\)",
                rf"\1 (`docs/{optional}`)",
                markdown,
            )
    if "<!-- generated: method-table -->" in markdown:
        markdown = markdown.replace("<!-- generated: method-table -->", method_table_markdown())
    if "<!-- generated: config-groups -->" in markdown:
        markdown = markdown.replace("<!-- generated: config-groups -->", config_groups_markdown(depth))
    if "<!-- generated: identity-table -->" in markdown:
        markdown = markdown.replace("<!-- generated: identity-table -->", identity_table_markdown())
    return markdown


def _collect(items, found: set[str]) -> None:
    for item in items:
        found.add(item.id)
        _collect(item.children, found)


# A Sphinx role in a docstring (":func:`x`", "~.module.x"), as mkdocstrings leaves it in the HTML.
SPHINX_ROLE = re.compile(r":(?:func|class|meth|data|mod|attr|exc):<code>~?\.?(?:[\w.]+\.)?([\w]+)</code>")


def on_page_content(html, page, config, files):
    html = SPHINX_ROLE.sub(r"<code>\1</code>", html)
    found: set[str] = set()
    _collect(page.toc.items, found)
    found.update(re.findall(r'id="([^"]+)"', html))
    _anchors[page.file.src_uri] = found
    return html


def _pointers() -> dict[tuple[str, str], list[str]]:
    """Every ``docs/<page>.md#<anchor>`` of the tracked files, with where it stands."""
    files = subprocess.run(
        ["git", "ls-files", *POINTER_PLACES], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found: dict[tuple[str, str], list[str]] = {}
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".yaml", ".md", ".sh", ".csv", ".toml", "") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in POINTER.finditer(line):
                found.setdefault((m["page"], m["anchor"] or ""), []).append(f"{name}:{number}")
    return found


def on_post_build(config):
    bad = []
    for (page, anchor), where in sorted(_pointers().items()):
        if page not in _anchors and not (DOCS / page).is_file():
            bad.append(f"docs/{page} (no such page): {', '.join(where[:3])}")
        elif anchor and page in _anchors and anchor not in _anchors[page]:
            bad.append(f"docs/{page}#{anchor} (no such heading): {', '.join(where[:3])}")
    if bad:
        raise PluginError("pointers to the docs point nowhere:\n  " + "\n  ".join(bad))
