"""Every ```python block of README.md and docs/*.md runs, offline, as the reader sees it.

A file's python blocks are run as one script (in a fresh directory), in order, so a block may
use what an earlier block of the same file defined. Prose lines become blank lines, so a line
number in a traceback is the line of the markdown file.

Offline swaps. A line that needs something this machine cannot reach (a hub checkpoint, NDIF)
says how to run it without, in a trailing comment the reader sees:

    clip = px.load("open_clip:ViT-B-32/openai")  # offline: "open_clip:ViT-B-32/openai" -> "builtin:shapes-clip"

Each `OLD -> NEW` pair (Python string literals; several pairs are separated by commas) is a
literal replacement on that line only, which the test applies before running. The OLD text must
occur exactly once in the code before the comment, else the test fails: a swap cannot silently
stop applying when the line changes.
"""

from __future__ import annotations

import ast
import os
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Markdown files with python blocks that are not run (yet), each with the reason. Deleting a
# line here is all it takes to run that file's blocks.
EXCLUDED: dict[str, str] = {}  # doc -> why its python blocks are not run (none is left out)

_OPEN = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
_SWAP_MARK = re.compile(r"#\s*offline:\s*(?P<pairs>.*)$")
_STRING = r"""(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
_PAIR = re.compile(rf"\s*(?P<old>{_STRING})\s*->\s*(?P<new>{_STRING})\s*(?:,|$)")


def doc_files() -> list[str]:
    """README.md and docs/*.md that hold at least one python block, as paths from the root."""
    candidates = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p.relative_to(ROOT).as_posix() for p in candidates if python_blocks(p.read_text())]


def python_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The ```python blocks of a markdown text: (line index of the first code line, its lines),
    dedented by the fence's indentation (a block inside a list item)."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = m["indent"], i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"the python block opened on line {start} is never closed")
        blocks.append((start, body))
        i += 1
    return blocks


def apply_swaps(line: str) -> str:
    """A code line with its `# offline: OLD -> NEW` swaps applied (the line itself without one)."""
    mark = _SWAP_MARK.search(line)
    if not mark:
        return line
    code, comment, pairs = line[:mark.start()], line[mark.start():], mark["pairs"].strip()
    pos, swaps = 0, []
    while pos < len(pairs):
        m = _PAIR.match(pairs, pos)
        if not m or m.end() == pos:
            raise AssertionError(f"cannot read the offline swap {pairs!r} (want \"OLD\" -> \"NEW\", ...) in: {line}")
        swaps.append((ast.literal_eval(m["old"]), ast.literal_eval(m["new"])))
        pos = m.end()
    if not swaps:
        raise AssertionError(f"an offline comment without a swap in: {line}")
    for old, new in swaps:
        count = code.count(old)
        if count != 1:
            raise AssertionError(f"offline swap {old!r} -> {new!r}: {old!r} occurs {count} times (want once) "
                                 f"in the code of: {line}")
        code = code.replace(old, new)
    return code + comment


def snippet_script(text: str) -> str:
    """The python blocks of a markdown text as one script whose line numbers are the file's."""
    lines = text.splitlines()
    out = [""] * len(lines)
    for start, body in python_blocks(text):
        for j, line in enumerate(body):
            out[start + j] = apply_swaps(line)
    return "\n".join(out) + "\n"


@pytest.fixture
def state_restored():
    """Snippets may register adapters (docs/adapters.md) or set environment variables
    (HF_HUB_OFFLINE in docs/transformerlens-bridge.md); both are put back after."""
    from prisma_ext.adapters import registry

    adapters, environ = list(registry._user_adapters), dict(os.environ)
    yield
    registry._user_adapters[:] = adapters
    os.environ.clear()
    os.environ.update(environ)


DOCS = [name for name in doc_files() if name not in EXCLUDED]


@pytest.mark.parametrize("name", DOCS)
def test_doc_snippets_run(name, tmp_path, monkeypatch, state_restored):
    """The file's python blocks, with their declared offline swaps, run as one script."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / (Path(name).stem + "_snippets.py")  # nnsight traces need their source in a file
    script.write_text(snippet_script((ROOT / name).read_text()))
    runpy.run_path(str(script), run_name="__main__")


def test_every_doc_with_python_is_run_but_the_excluded_ones():
    found = set(doc_files())
    assert "README.md" in found and "docs/quickstart.md" in found
    assert not EXCLUDED, f"every doc's python blocks must run; left out: {EXCLUDED}"
    assert set(DOCS) == found


def test_swaps_are_literal_on_their_line_and_fail_when_stale():
    line = ('clip = px.load("open_clip:ViT-B-32/openai")  '
            '# offline: "open_clip:ViT-B-32/openai" -> "builtin:shapes-clip"')
    assert apply_swaps(line).startswith('clip = px.load("builtin:shapes-clip")  # offline:')
    two = "m = load('hf:x', remote=True)  # offline: 'hf:x' -> 'hf:y', 'remote=True' -> 'remote=\"local\"'"
    assert apply_swaps(two).startswith("m = load('hf:y', remote=\"local\")")
    assert apply_swaps("x = 1  # an ordinary comment") == "x = 1  # an ordinary comment"
    with pytest.raises(AssertionError, match="occurs 0 times"):
        apply_swaps('clip = px.load("open_clip:ViT-L-14")  # offline: "open_clip:ViT-B-32/openai" -> "builtin:x"')
    with pytest.raises(AssertionError, match="cannot read"):
        apply_swaps("x = 1  # offline: use a smaller model")


def test_the_script_keeps_the_markdown_line_numbers():
    text = "# Title\n\n```python\nx = 1\n```\n\nprose\n\n  ```python\n  y = x + 1\n  ```\n"
    script = snippet_script(text).splitlines()
    assert script[3] == "x = 1" and script[9] == "y = x + 1"
    assert [s for s in script if s] == ["x = 1", "y = x + 1"]
