#!/usr/bin/env python3
"""Build the single-file image: `python3 build/zipapp.py [--platform x86_64|aarch64]`.

Reads zipapp.spec and writes dist/matte.pyz: the firmware and board sources and the pure-Python
dependencies, run from inside the archive, plus the wheels with native code (cryptography,
msgpack, cffi) for the chosen platform, which the image extracts once, on first start, to a
cache directory named after its build id (as shiv does). The image needs nothing but Python.

Reproducible: entries are sorted, timestamps and modes fixed, bytecode is hash-based, and the
wheels are pinned, so the same sources build the same bytes.

This is a script, not a package: a `build` package would shadow PyPA's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import os
import platform
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can have
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")

BOOTSTRAP = '''\
"""Start Matte from its single-file image (built by build/zipapp.py)."""

import os
import platform
import shutil
import sys
import tempfile
import zipfile

BUILD_ID = {build_id!r}
MACHINE = {machine!r}
PYTHON = {python!r}
ENTRY = {entry!r}


def fail(message):
    sys.stderr.write("matte.pyz: " + message + "\\n")
    sys.exit(2)


def cache_root():
    """MATTE_CACHE_DIR, else systemd's CacheDirectory=, else ~/.cache/matte."""
    for name in ("MATTE_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(name):
            return os.environ[name].split(":")[0]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "matte")


def native_dir(archive):
    """The image's native wheels, extracted once; a directory appears whole or not at all."""
    root = cache_root()
    target = os.path.join(root, BUILD_ID)
    if os.path.isdir(target):
        return target
    os.makedirs(root, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
    with zipfile.ZipFile(archive) as image:
        for info in image.infolist():
            if not info.filename.startswith("native/") or info.is_dir():
                continue
            dest = os.path.join(tmp, info.filename[len("native/"):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with image.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    try:
        os.rename(tmp, target)
    except OSError:  # another start extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main():
    if "%d.%d" % sys.version_info[:2] != PYTHON:
        fail("built for Python %s, this is %d.%d" % ((PYTHON,) + sys.version_info[:2]))
    if platform.machine() != MACHINE:
        fail("built for %s, this machine is %s" % (MACHINE, platform.machine()))
    archive = os.path.dirname(os.path.abspath(__file__))
    sys.path[:1] = [archive, native_dir(archive)]
    module, _, function = ENTRY.partition(":")
    sys.argv[0] = "matte"
    sys.exit(getattr(__import__(module, fromlist=[function]), function)())


main()
'''


def load_spec(path: Path) -> dict:
    with open(path, "rb") as f:
        spec = tomllib.load(f)
    for key in ("output", "entry", "python", "sources", "platforms", "requirements"):
        if key not in spec:
            sys.exit(f"{path}: missing {key!r}")
    for req in spec["requirements"]["wheels"]:
        if "==" not in req:
            sys.exit(f"{path}: {req!r} is not pinned (name==version): builds would differ")
    return spec


def wheel_prefix(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{name.replace('-', '_').lower()}-{version}-"


def fetch_wheels(spec: dict, platform_tag: str, cache: Path) -> list[Path]:
    """The pinned wheels for the platform, downloaded once into the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = spec["requirements"]["wheels"]

    def find(req: str) -> Path | None:
        hits = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(wheel_prefix(req)))
        return hits[0] if hits else None

    missing = [r for r in wanted if find(r) is None]
    if missing:
        version = spec["python"]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--platform", platform_tag, "--python-version", version,
             "--implementation", "cp", "--abi", "cp" + version.replace(".", ""),
             "--dest", str(cache), *missing],
            check=True)
    wheels = []
    for req in wanted:
        path = find(req)
        if path is None:
            sys.exit(f"no wheel for {req} on {platform_tag}")
        wheels.append(path)
    return wheels


def is_pure(wheel: Path) -> bool:
    return wheel.name.endswith("-none-any.whl")


def compiled(name: str, source: bytes, python: str) -> bytes | None:
    """Hash-based, unchecked bytecode for `name` (zipimport loads it without the source's
    timestamp); None when this interpreter is not the target's."""
    if "%d.%d" % sys.version_info[:2] != python:
        return None
    try:
        code = compile(source, name, "exec", dont_inherit=True, optimize=0)
    except SyntaxError:
        return None  # e.g. a vendored Python-2 file: zipimport uses the source
    from importlib import _bootstrap_external

    return bytes(_bootstrap_external._code_to_hash_pyc(
        code, importlib.util.source_hash(source), checked=False))


def add_python(entries: dict[str, bytes], name: str, data: bytes, python: str) -> None:
    entries[name] = data
    if name.endswith(".py"):
        pyc = compiled(name, data, python)
        if pyc is not None:
            entries[name + "c"] = pyc


def collect(spec: dict, wheels: list[Path]) -> dict[str, bytes]:
    entries: dict[str, bytes] = {}
    python = spec["python"]
    for top in spec["sources"]:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if path.is_dir() or SKIP_DIRS & set(rel.parts) or path.name.endswith(SKIP_SUFFIXES):
                continue
            add_python(entries, rel.as_posix(), path.read_bytes(), python)
    for wheel in wheels:
        pure = is_pure(wheel)
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.is_dir() or info.filename.endswith(SKIP_SUFFIXES):
                    continue
                data = z.read(info)
                if pure:
                    # at the root, beside firmware/: importlib.metadata finds the
                    # .dist-info of a zip on sys.path only at its top
                    add_python(entries, info.filename, data, python)
                else:  # extracted on first start; imported from the cache directory
                    entries["native/" + info.filename] = data
    return entries


def build_id(entries: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(name.encode() + b"\0" + hashlib.sha256(entries[name]).digest())
    return h.hexdigest()[:16]


def write_image(out: Path, entries: dict[str, bytes]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w") as z:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.create_system = 3  # Unix, whatever builds it
            z.writestr(info, entries[name], compresslevel=9)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.chmod(0o755)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "zipapp.spec")
    parser.add_argument("--platform", help="target machine (default: this one's)")
    parser.add_argument("--output", type=Path, help="default: the spec's output")
    parser.add_argument("--wheels", type=Path, help="wheel cache (default: dist/wheels/PLATFORM)")
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    machine = args.platform or platform.machine()
    if machine not in spec["platforms"]:
        parser.error(f"--platform must be one of {', '.join(spec['platforms'])}, got {machine!r}")
    cache = args.wheels or ROOT / "dist" / "wheels" / machine
    wheels = fetch_wheels(spec, spec["platforms"][machine], cache)
    entries = collect(spec, wheels)
    ident = build_id(entries)
    entries["__main__.py"] = BOOTSTRAP.format(build_id=ident, machine=machine,
                                              python=spec["python"], entry=spec["entry"]).encode()
    out = args.output or ROOT / spec["output"]
    write_image(out, entries)
    size = out.stat().st_size
    print(f"{out}: {size} bytes ({size / 2**20:.1f} MiB), {machine}, build {ident}, "
          f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
