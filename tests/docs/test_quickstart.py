"""The commands of docs/quickstart.md (and README.md's) work as written from the repository root:
each runs `.venv/bin/prisma-ext` (or `bash scripts/...`), parses with the CLI's own argparse
parser, and names files that exist; one cheap command runs for real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from prisma_ext import cli

ROOT = Path(__file__).resolve().parents[2]
EXE = ".venv/bin/prisma-ext"
DOCS = ["docs/quickstart.md", "README.md"]
# file arguments: --image and --corrupted take a file or a keyword; --out names a file to write
INPUT_FILES, KEYWORDS = ("--image", "--corrupted"), {"auto", "blur"}


def bash_commands(name: str) -> list[list[str]]:
    """Every command of the file's ```bash blocks as an argv (comments dropped, `&&` and `;` split)."""
    text = (ROOT / name).read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", ";"):
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(word)
    return commands


def _value(argv: list[str], option: str) -> str | None:
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


@pytest.mark.parametrize("name", DOCS)
def test_commands_run_the_venv_cli_and_parse(name):
    commands = bash_commands(name)
    prisma = [c for c in commands if c[0] != "bash"]
    assert prisma, f"{name} has no prisma-ext commands"
    for argv in commands:
        if argv[0] == "bash":  # bash scripts/setup.sh [--test]
            assert (ROOT / argv[1]).is_file(), f"{name}: {shlex.join(argv)}: no {argv[1]}"
            continue
        assert argv[0] == EXE, f"{name}: {shlex.join(argv)}: run {EXE} (from the repository root)"
        assert argv[1] in cli.COMMANDS, f"{name}: {shlex.join(argv)}: no command {argv[1]!r}"
        try:
            cli.build_parser().parse_args(argv[1:])
        except SystemExit as exit_:
            pytest.fail(f"{name}: {shlex.join(argv)} does not parse (exit {exit_.code})")


@pytest.mark.parametrize("name", DOCS)
def test_file_arguments_exist(name):
    checked = 0
    for argv in bash_commands(name):
        for option in INPUT_FILES:
            value = _value(argv, option)
            if value is None or value.startswith("builtin:") or value in KEYWORDS:
                continue
            assert (ROOT / value).is_file(), f"{name}: {shlex.join(argv)}: {value} does not exist"
            checked += 1
        out = _value(argv, "--out")
        if out is not None:
            assert (ROOT / out).parent.is_dir(), f"{name}: {shlex.join(argv)}: no folder for {out}"
            checked += 1
    if name == "docs/quickstart.md":
        assert checked >= 2  # the JPEG and the --out of the options block


def test_the_example_image_is_a_small_jpeg():
    from PIL import Image

    path = ROOT / "docs/images/cat.jpg"
    assert path.stat().st_size < 40_000
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) >= 224


def test_the_parser_of_the_check_refuses_a_bad_command():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["report", "--no-such-option"])


def test_sites_runs_for_real(capsys):
    assert [".venv/bin/prisma-ext", "sites", "builtin:shapes-vit"] in bash_commands("docs/quickstart.md")
    assert cli.main(["sites", "builtin:shapes-vit"]) == 0
    out = capsys.readouterr().out
    assert "blocks.3.attn.hook_pattern" in out and "hook_patch_embed" in out
