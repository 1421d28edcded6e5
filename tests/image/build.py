"""The single-file image, built once per test run (or MATTE_IMAGE: one built before)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=None)
def built_image() -> Path:
    given = os.environ.get("MATTE_IMAGE")
    if given:
        return Path(given).resolve()
    out_dir = Path(tempfile.mkdtemp(prefix="matte-image-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    out = out_dir / "matte.pyz"
    subprocess.run([sys.executable, str(ROOT / "build" / "zipapp.py"), "--output", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def bare_python() -> list[str]:
    """This interpreter with no site-packages at all (-S) and no environment (-I): what a
    gateway that has only Python has."""
    return [sys.executable, "-I", "-S"]


def image_command(image: Path, config: Path) -> list[str]:
    return [*bare_python(), str(image), "run", "--config", str(config)]
