"""The README and docs/ say what the code and CI do: the README stays short, every relative link
and anchor resolves, the set-up commands are the ones .ci/run runs, and every command, option,
module path and public name the pages show exists in the package."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest

import gradindex
from gradindex.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
README_LIMIT = 15 * 1024  # bytes: the page a user lands on (issue 17)

# The set-up block of the README, exactly (issue 17: the two commands do not change).
SETUP_DEMO = "pip install torch==2.13.0 -e . && gradindex demo --out demo_out"
SETUP_TESTS = 'pip install -e ".[dev]" && python -m pytest -q'

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
NUMBER = re.compile(r"-?\d[\d.e+-]*")


def doc_pages() -> list[Path]:
    return [README, CHANGELOG, *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """Markdown without fenced code blocks (a `# comment` there is no heading, `a[0](b)` no link)."""
    return FENCE.sub("", text)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    heads = re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", prose(page.read_text()), re.M)
    return {slug(h) for h in heads}


def relative_links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(page.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_file():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{page.name}: {target} (no heading with that anchor)")
    return bad


def test_readme_is_short():
    assert README.stat().st_size <= README_LIMIT, f"README.md is {README.stat().st_size} bytes"


def test_every_relative_link_resolves():
    pages = doc_pages()
    assert len(pages) > 3 and all(p.is_file() for p in pages)
    bad = [b for p in pages for b in broken_links(p)]
    assert not bad, "\n".join(bad)


def test_link_check_catches_a_broken_file_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# There\n\n## Some (odd) title\n")
    page.write_text(
        "[a](there.md) [b](there.md#some-odd-title) [c](missing.md) [d](there.md#nope)\n"
        "![e](gone.png) `[f](in-code.md)`\n```\n[g](fenced.md)\n```\n[h](https://x.org/y)\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: there.md#nope (no heading with that anchor)",
        "page.md: gone.png (no such file)",
    ]


def test_readme_links_every_docs_page_and_shows_the_demo_picture():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages and not pages - linked, f"docs pages the README does not link: {pages - linked}"
    assert (ROOT / "docs" / "demo_attribution.png").resolve() in linked
    assert "![" in README.read_text().split("docs/demo_attribution.png")[0].rsplit("\n", 1)[-1]


def setup_commands() -> list[str]:
    section = README.read_text().split("## Set-up", 1)[1]
    block = code_blocks(section, "bash")[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def ci_lines() -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_setup_commands_are_unchanged():
    assert setup_commands() == [SETUP_DEMO, SETUP_TESTS]


def test_readme_test_command_is_the_one_ci_runs():
    """.ci/run installs what the README's set-up installs and runs its test command (plus only
    `-p no:cacheprovider`, which keeps a clean clone clean and selects no other tests)."""
    demo_install, _ = SETUP_DEMO.split(" && ")
    test_install, test_cmd = setup_commands()[1].split(" && ")
    ci = ci_lines()
    runs = [shlex.split(ln) for ln in ci if ln.startswith("python -m pytest")]
    assert len(runs) == 1, "one pytest command in .ci/run"
    extra = runs[0][len(shlex.split(test_cmd)) :]
    assert runs[0][: len(shlex.split(test_cmd))] == shlex.split(test_cmd)
    assert extra == ["-p", "no:cacheprovider"], f".ci/run adds {extra}"
    installs = [[a for a in shlex.split(ln)[2:] if a != "-q"] for ln in ci if ln.startswith("pip ")]
    assert shlex.split(test_install)[2:] in installs
    torch_pin = [a for a in shlex.split(demo_install) if a.startswith("torch==")]
    assert torch_pin and torch_pin in installs, f"README pins {torch_pin}, .ci/run {installs}"


def command_options(name: str) -> set[str]:
    cmd = main.commands[name]
    opts = {"--help"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            opts |= set(p.opts) | set(p.secondary_opts)
    return opts


def cli_invocations(text: str) -> list[list[str]]:
    """Every `gradindex CMD ...` (or `-m gradindex.cli CMD ...`) in the bash blocks, as words."""
    found = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|(?!\|)", line.split(" #", 1)[0]):
                words = shlex.split(part)
                for i, w in enumerate(words[:-1]):
                    if w in ("gradindex", "gradindex.cli") and (i == 0 or words[i - 1] == "-m"):
                        found.append(words[i + 1 :])
                        break
    return found


def unknown_options(args: list[str]) -> list[str]:
    if args[0] not in main.commands:
        return [f"no command {args[0]!r}"]
    known = command_options(args[0])
    flags = [a for a in args[1:] if a.startswith("-") and not NUMBER.fullmatch(a)]
    return [f"{args[0]} {f}" for f in flags if f.split("=")[0] not in known]


def test_commands_and_options_in_code_blocks_exist():
    calls = [c for p in doc_pages() for c in cli_invocations(p.read_text())]
    assert len(calls) > 10
    bad = [u for c in calls for u in unknown_options(c)]
    assert not bad, bad


def test_option_check_catches_a_renamed_option():
    text = "```bash\ngradindex query idx q.npy --methods both\ngradindex serach idx\n```\n"
    calls = cli_invocations(text)
    assert [u for c in calls for u in unknown_options(c)] == [
        "query --methods",
        "no command 'serach'",
    ]


def table_rows(text: str) -> list[list[str]]:
    rows = [ln for ln in prose(text).splitlines() if ln.startswith("|") and "---" not in ln]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]


def command_table(page: Path) -> dict[str, str]:
    """{command: options cell} of a page's table whose first cells are `gradindex` commands."""
    table = {}
    for cells in table_rows(page.read_text()):
        spans = CODE_SPAN.findall(cells[0])
        name = spans[0].split()[0] if spans else ""
        if name in main.commands and len(cells) > 1:
            table[name] = cells[1]
    return table


@pytest.mark.parametrize("page", ["README.md", "docs/usage.md"])
def test_command_tables_cover_every_command_with_real_options(page):
    table = command_table(ROOT / page)
    assert set(table) == set(main.commands), f"{page}: commands missing from its table"
    bad = []
    for name, cell in table.items():
        for span in CODE_SPAN.findall(cell):
            opts = OPTION.findall(span)
            bad += [f"{name} {o}" for o in opts if o not in command_options(name)]
            choices = re.findall(r"^(--?[\w-]+) ([\w]+(?:\\\|[\w]+)+)$", span)
            for opt, values in choices:
                param = next(p for p in main.commands[name].params if opt in p.opts)
                if isinstance(param.type, click.Choice):
                    bad += [
                        f"{name} {opt} {v}"
                        for v in values.split("\\|")
                        if v not in param.type.choices
                    ]
    assert not bad, bad


def dotted_paths(text: str) -> set[str]:
    return {s for s in CODE_SPAN.findall(text) for s in re.findall(r"\bgradindex(?:\.\w+)+", s)}


def resolves(dotted: str) -> bool:
    """`gradindex.a.b.name` is a module, or an attribute of the longest importable module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_module_paths_and_public_names_in_the_docs_exist():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in pages)
    dotted = dotted_paths(text)
    files = {
        s
        for s in CODE_SPAN.findall(text)
        if re.fullmatch(r"(gradindex|benchmarks|tests|tools|docs)/[\w/.-]+\.\w+", s)
    }
    public = set(re.findall(r"\bgi\.(\w+)", "\n".join(code_blocks(text, "python") + [text])))
    assert len(dotted) > 5 and len(files) > 10 and {"BuildSpec", "build_index"} <= public
    bad = [d for d in sorted(dotted) if not resolves(d)]
    bad += [f for f in sorted(files) if not (ROOT / f).is_file()]
    bad += [f"gi.{n}" for n in sorted(public) if n not in gradindex.__all__]
    assert not bad, bad


def _importable(module: str) -> bool:
    """find_spec, False where a parent package is gone too (gradindex.index.* after the split)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_changelog_maps_old_module_paths_to_importable_new_ones():
    rows = [r for r in table_rows(CHANGELOG.read_text()) if r[0].startswith("`gradindex.")]
    assert len(rows) > 20
    bad = []
    for old_cell, new_cell in (r[:2] for r in rows):
        old = CODE_SPAN.findall(old_cell)[0]
        new = [d for d in dotted_paths(new_cell)]
        bad += [d for d in new if not resolves(d)]
        if not any(d.startswith(old + ".") for d in new) and _importable(old):
            bad.append(f"{old} still imports")
    assert not bad, bad


def test_architecture_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = {
        f"gradindex/{s}"
        for cells in table_rows(text)
        for s in CODE_SPAN.findall(cells[0])
        if s.endswith(".py")
    }
    tree = "\n".join(code_blocks(text, "text"))
    top = {f"gradindex/{m}" for m in re.findall(r"^  (\w+\.py)", tree, re.M)}
    actual = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "gradindex").rglob("*.py")
        if p.name != "__init__.py"
    }
    assert listed and not listed - actual, f"listed but missing: {sorted(listed - actual)}"
    assert not actual - listed - top, (
        f"not in docs/architecture.md: {sorted(actual - listed - top)}"
    )
