"""Screenshot an evaluation report.html with headless Chromium (to check a person can read it).

    python scripts/screenshot_report.py OUT/report.html [--png report.png] [--width 1400]
                                        [--height 3000]

Needs a Chromium binary (Debian: `apt-get install -y chromium`); --chromium names another.
Chromium runs with no network, no sync and no GPU, on the local file only.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(explicit: str | None = None) -> str:
    for name in (explicit,) if explicit else CANDIDATES:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise FileNotFoundError(
        "no Chromium found (tried " + ", ".join(CANDIDATES) + "); install it, e.g. "
        "`apt-get install -y chromium`, or pass --chromium PATH"
    )


def screenshot(
    html: Path,
    png: Path,
    width: int = 1400,
    height: int = 3000,
    chromium: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """Render `html` to `png` at width x height pixels; raises if Chromium writes nothing."""
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"no report at {html}")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="adrel-chromium-") as profile:
        cmd = [
            find_chromium(chromium),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(
            f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
        )
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path, help="the report.html to render")
    ap.add_argument("--png", type=Path, help="output PNG (default: next to the report)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--chromium", help="Chromium binary (default: found on PATH)")
    args = ap.parse_args(argv)
    png = args.png or args.html.with_suffix(".png")
    try:
        out = screenshot(args.html, png, args.width, args.height, args.chromium)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot_report: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
