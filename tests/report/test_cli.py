"""The `prisma-ext` command line and the sample-image helpers it uses."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from prisma_ext import cli
from prisma_ext.data import SAMPLE_IMAGES, load_image, sample_image

ERROR_PREFIX = "prisma-ext: error: "
TOP_K_LINE = re.compile(r"^\s*\d+\.\s+\d+\.\d\d%\s+\S")


def _assert_one_error_line(capsys, rc: int, *needles: str) -> str:
    _out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- the main job


def test_inspect_prints_summary_layout_sites_and_top_k(capsys, tmp_path):
    from PIL import Image

    # A non-square image that is not 224 x 224, so preprocess has to resize it.
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (180, 260, 3), dtype=np.uint8)).save(path)

    rc = cli.main(
        ["inspect", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--image", str(path), "--top-k", "3"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "== architecture ==" in out and "== token layout ==" in out

    # ViT-Tiny/16 at 224: 1 CLS + 14*14 patches = 197 tokens, d_model 192, 3 heads, 12 blocks.
    rows = dict(re.findall(r"^(\S+)\s+\((\d+(?:, \d+)*)\)$", out, flags=re.MULTILINE))
    assert rows["blocks.0.hook_resid_post"] == "1, 197, 192"
    assert rows["blocks.11.hook_resid_post"] == "1, 197, 192"
    assert rows["blocks.0.attn.hook_pattern"] == "1, 3, 197, 197"
    assert "blocks.12.hook_resid_post" not in rows

    top = [line for line in out.splitlines() if TOP_K_LINE.match(line)]
    assert len(top) == 3, out
    probs = [float(re.search(r"(\d+\.\d\d)%", line).group(1)) for line in top]
    assert probs == sorted(probs, reverse=True)
    assert 0.0 < probs[0] <= 100.0


def test_no_command_means_inspect_with_defaults(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_inspect", lambda args: seen.append(args) or 0)
    assert cli.main([]) == 0
    assert cli.main(["--top-k", "2"]) == 0
    assert seen[0].model == "builtin:shapes-vit"  # the same default as report's: trained, offline
    assert seen[0].random_weights is False
    assert seen[0].image is None
    assert seen[0].top_k == 5
    assert seen[1].top_k == 2


# --------------------------------------------------------------------------- bad input


def test_missing_image_is_one_error_line(capsys, tmp_path):
    missing = tmp_path / "no-such-image.png"
    rc = cli.main(["inspect", "--image", str(missing)])
    _assert_one_error_line(capsys, rc, "no-such-image.png")


def test_text_file_as_image_is_one_error_line(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\nsecond line\n")
    rc = cli.main(["inspect", "--image", str(text)])
    _assert_one_error_line(capsys, rc, "notes.txt")


def test_unknown_model_is_one_error_line(capsys):
    rc = cli.main(["inspect", "--model", "timm:vit_nope"])
    _assert_one_error_line(capsys, rc, "vit_nope")


def test_bad_top_k_is_one_error_line(capsys):
    rc = cli.main(["inspect", "--top-k", "0"])
    _assert_one_error_line(capsys, rc, "--top-k")


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["inspect", "--top-k", "three"])
    assert info.value.code == 2
    assert "prisma-ext inspect: error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- staying light


def test_import_prisma_ext_stays_light():
    code = (
        "import prisma_ext, prisma_ext.cli, sys; "
        "heavy = [m for m in ('timm', 'transformer_lens', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_help_runs_without_heavy_imports():
    code = (
        "import sys; from prisma_ext.cli import main\n"
        "try:\n    main(['inspect', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "--random-weights" in res.stdout and "--top-k" in res.stdout


# --------------------------------------------------------------------------- sample images


@pytest.mark.parametrize("name", SAMPLE_IMAGES)
def test_sample_images_are_rgb_uint8(name):
    img = sample_image(name)
    assert img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] >= 100 and img.shape[1] >= 100
    assert img.std() > 10  # a photo, not a blank


def test_sample_image_unknown_name_lists_the_names():
    with pytest.raises(ValueError) as info:
        sample_image("dog")
    msg = str(info.value)
    assert "'dog'" in msg and all(name in msg for name in SAMPLE_IMAGES)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = tmp_path / f"img-{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    img = load_image(path)
    assert img.shape == (7, 9, 3) and img.dtype == np.uint8
    if mode == "RGB":
        np.testing.assert_array_equal(img, rgb)  # PNG is lossless


def test_load_image_errors_name_the_path(tmp_path):
    from prisma_ext.errors import PrismaError

    with pytest.raises(PrismaError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(PrismaError, match="directory"):
        load_image(tmp_path)
    bad = tmp_path / "fake.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(PrismaError, match="fake.jpg"):
        load_image(bad)


# --------------------------------------------------------------------------- report, models, sites


def test_report_defaults(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_report", lambda args: seen.append(args) or 0)
    assert cli.main(["report"]) == 0
    args = seen[0]
    assert (args.model, args.image, args.target, args.corrupted, args.out) == (
        "builtin:shapes-vit", None, None, "auto", "report.html")
    assert args.top_k == 5 and not args.random_weights and not args.quiet


def test_models_lists_the_sources(capsys):
    """Counts and features from the packaged parity census (which tests/docs/test_parity.py ties
    to the docs' table and to a fresh run)."""
    from prisma_ext.catalog import parity

    census = parity()
    done = {f: sum(status == "reproduced" for _, status in rows.values()) for f, rows in census.items()}
    assert cli.main(["models", "--all"]) == 0
    out = capsys.readouterr().out
    for needle in ("builtin:shapes-vit", "builtin:shapes-clip", "timm:NAME", "vit_small_patch14_reg4_dinov2",
                   "eva02_small_patch14_224", "open_clip:ARCH/TAG", "EVA02-B-16", "ViT-B-16-SigLIP2",
                   f"{done['timm']} of {len(census['timm'])} named", f"{done['open_clip']} of "
                   f"{len(census['open_clip'])} named", "open_clip CoCa", "traced on nnsight", "hf:REPO",
                   "DINOv3ViTModel", "register_adapter"):
        assert needle in out, needle
    assert done["timm"] + done["open_clip"] + done["hf"] >= 330


def test_sites_lists_names_and_shapes(capsys):
    assert cli.main(["sites", "builtin:shapes-vit"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\S+)\s+\((\d+(?:, \d+)*)\)$", out, flags=re.MULTILINE))
    assert "blocks.0.hook_resid_pre" in rows and "blocks.0.attn.hook_pattern" in rows
    assert rows["blocks.0.hook_resid_pre"].startswith("1, ")


def test_sites_unknown_model_is_one_error_line(capsys):
    rc = cli.main(["sites", "timm:vit_nope"])
    _assert_one_error_line(capsys, rc, "vit_nope")


@pytest.mark.parametrize("command", ["report", "models", "sites"])
def test_subcommand_help_stays_light(command):
    code = (
        "import sys; from prisma_ext.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert command in res.stdout


def test_readme_first_lines_are_the_two_commands_and_ci_runs_the_second():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    first, second = root.joinpath("README.md").read_text().splitlines()[:2]
    assert first == "bash scripts/setup.sh && .venv/bin/prisma-ext report"
    assert second == "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q"
    ci = root.joinpath(".ci", "run").read_text()
    assert "sed -n 2p README.md" in ci and 'exec bash -c "$command_line"' in ci


@pytest.mark.parametrize(("mode", "top"), [("I;16", 65535), ("L", 255), ("P", 255), ("RGBA", 255), ("RGB", 255)])
def test_deep_and_paletted_images_keep_their_values(tmp_path, mode, top):
    """PIL's convert("RGB") clips 16-bit greyscale to white: a mid-grey 16-bit PNG came out blank."""
    from PIL import Image

    ramp = np.linspace(0, top, 7 * 9).reshape(7, 9)
    path = tmp_path / f"ramp-{mode.replace(';', '')}.png"
    if mode == "I;16":  # a 16-bit greyscale PNG (PNG stores it as I;16; PIL reads it back so)
        Image.fromarray(ramp.astype(np.uint16)).save(path)
        assert Image.open(path).mode == "I;16"
    else:
        Image.fromarray(ramp.astype(np.uint8), mode="L").convert(mode).save(path)
    img = load_image(path)
    assert img.shape == (7, 9, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(img[..., 0].astype(float), np.round(ramp / top * 255), atol=1)
    assert img.min() == 0 and img.max() == 255  # a ramp, not a white page


# --------------------------------------------------------------------------- behaviour issue 15 asked for


def test_inspect_and_report_print_the_same_prediction(capsys):
    """The same defaults (the built-in model, pretrained, a scene of its classes) and the same
    numbers: inspect's top line is report's top class with its probability."""
    from prisma_ext.report.build import prepare

    assert cli.main(["inspect", "--top-k", "1", "--image", "builtin:blue-triangle"]) == 0
    out = capsys.readouterr().out
    top = [line for line in out.splitlines() if TOP_K_LINE.match(line)]
    ctx = prepare(image="builtin:blue-triangle")
    best = int(ctx.probs.argmax())
    assert "(pretrained weights)" in out and "builtin:blue-triangle" in out
    assert top == [f"  1. {float(ctx.probs[best]):7.2%}  {ctx.name(best)} (class {best})"]


def test_an_unwritable_out_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    import prisma_ext.report.build as build

    folder = tmp_path / "read-only"
    folder.mkdir()
    monkeypatch.setattr(build, "prepare", lambda *a, **k: pytest.fail("the run started"))
    real = build.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):  # a read-only file system, which root's os.access cannot see
        if dir is not None and str(dir) == str(folder):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(build.tempfile, "mkstemp", refuse)
    rc = cli.main(["report", "--out", str(folder / "r.html")])
    _assert_one_error_line(capsys, rc, "is not writable", "Permission denied")
    assert list(folder.iterdir()) == []


def test_ctrl_c_exits_130_quietly_and_leaves_no_file(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "prisma_ext.cli", "report"], cwd=tmp_path, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    seen = ""
    deadline = time.monotonic() + 300
    while "[1/7]" not in seen and time.monotonic() < deadline:  # interrupt mid-run
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "[1/7]" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # no report, no temporary file


def test_an_unreachable_hub_fails_in_one_line_at_once(capsys, monkeypatch):
    """No network: the probe says so and the download runs in huggingface_hub's offline mode, so
    the error comes in seconds, not after minutes of retries; the offline flag is restored."""
    import time

    from huggingface_hub import constants

    from prisma_ext.sources import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-prisma-ext-cache")
    before = constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    rc = cli.main(["inspect", "--model", "timm:vit_tiny_patch16_224"])
    line = _assert_one_error_line(capsys, rc, "cannot be reached", "--random-weights")
    assert time.perf_counter() - start < 30, line
    assert constants.HF_HUB_OFFLINE == before


def test_the_hub_probe_tells_a_closed_port_from_an_open_one(monkeypatch):
    import socket

    from prisma_ext.sources import hub

    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(hub, "_reachable", {})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.hub_reachable()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: the connection is refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub.hub_reachable()
