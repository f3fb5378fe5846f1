"""hpcpath report: one self-contained HTML page.  The full pipeline's report (tiling,
training, inference, evaluation) is rendered in headless Chromium by tests/test_readme.py;
here: the report `hpcpath tile` leaves behind, with a failed slide, and bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]


@pytest.mark.slow
def test_tile_leaves_a_report_with_masks_and_failures(tmp_path):
    subprocess.run([*HPCPATH, "synth", "-o", str(tmp_path / "slides"), "-n", "2", "--size", "2048x2048"],
                   check=True, capture_output=True)
    (tmp_path / "slides" / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)  # not a slide
    p = subprocess.run([*HPCPATH, "tile", str(tmp_path / "slides"), "-o", str(tmp_path / "out"),
                        "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr
    report = tmp_path / "out" / "hpcpath-report.html"
    assert f"hpcpath: report {report}" in p.stderr
    text = report.read_text()
    assert not re.search(r"https?://|<script|<link", text, re.I)
    imgs = re.findall(r'<img class="([^"]+)" alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert sorted((c, a) for c, a, _ in imgs) == [("thumb tissue", "slide_000 tissue"),
                                                  ("thumb tissue", "slide_001 tissue")]
    import base64
    from io import BytesIO

    import numpy as np
    from PIL import Image

    for _, _, b64 in imgs:
        im = np.asarray(Image.open(BytesIO(base64.b64decode(b64))).convert("RGB"))
        assert max(im.shape[:2]) == 320 and im.std() > 5
        green = (im[..., 1] > im[..., 0] + 60) & (im[..., 1] > im[..., 2] + 60)
        assert green.any()  # the tissue outline
    # the failed slide and its one-line message, in the failures table
    fails = text.split('<table class="failures">', 1)[1].split("</table>", 1)[0]
    assert "broken" in fails and "tile" in fails
    # the stage's own manifest numbers
    assert re.search(r"<td>tile</td><td>[^<]*out</td><td>3</td>", text)


def test_report_of_a_folder_without_outputs_is_one_line(tmp_path):
    p = subprocess.run([*HPCPATH, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"hpcpath: error: {tmp_path}: no hpcpath outputs here")
    p = subprocess.run([*HPCPATH, "report", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a folder" in p.stderr and p.stderr.count("\n") == 1
