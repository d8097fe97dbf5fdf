"""What a report (trainer.report) must hold, checked on the directory a real run or sweep wrote it to."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from runs import metric


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, read from its IHDR chunk; fails on anything else."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_report(out_dir: Path, dirs: list[Path], expected: set[str]) -> list:
    """report.html in `out_dir` for `dirs` is self-contained and shows the `expected` plots (at least), each a
    sensible PNG in plots/ whose curves are the metrics they were drawn from. Returns the plots."""
    from trainer.report import Bars, collect, report_plots

    runs, bars = collect(dirs)
    plots = [*bars, *report_plots(runs)]
    assert expected <= {p.name for p in plots}, sorted(p.name for p in plots)
    by_name = {r.name: r for r in runs}
    for plot in plots:
        png = out_dir / "plots" / f"{plot.name}.png"
        width, height = png_size(png)
        assert 400 <= width <= 2000 and 250 <= height <= 1500 and png.stat().st_size > 5000, (png, width, height)
        if isinstance(plot, Bars):
            continue
        assert plot.curves, plot.name
        for curve in plot.curves:
            logged = metric(by_name[curve.run].dir, curve.metric)
            assert dict(zip(curve.steps, curve.values)) == logged and logged, (plot.name, curve.metric)
    page = (out_dir / "report.html").read_text()
    # Nothing outside the file: every image inline, no script, no link, no stylesheet or font fetched.
    assert len(re.findall(r"src=\"data:image/png;base64,", page)) == len(plots)
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "url(" not in page
    assert "@import" not in page and "http://" not in page and "https://" not in page
    return plots
