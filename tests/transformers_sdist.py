"""Load transformers' own common model tests from the source distribution of the installed transformers.

The common tests (`tests/test_modeling_common.py`) ship only in transformers' sdist, not in the wheel; this module
obtains that sdist at test time (never copying its code into this repository), extracts its top-level `tests/*.py`
into a cache folder as an importable package, and returns `test_modeling_common`.

The sdist lacks the sub-packages `tests/generation/` and `tests/exporters/`, which `test_modeling_common` imports
for `GenerationTesterMixin` and `ExportTesterMixin`: they get stand-in modules with empty mixins, so those two
families of tests are not run from here (our own generation oracles in tests/test_generation.py cover generation).

Where the sdist comes from, first hit wins:
1. `$SAISA_TRANSFORMERS_SDIST` — a path to `transformers-<version>.tar.gz` (CI pre-fetches it);
2. a cached copy in `~/.cache/modeling_saisa/` (or `$SAISA_CACHE_DIR`);
3. `python -m pip download --no-deps --no-binary :all: transformers==<version>` into that cache.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

PACKAGE = "saisa_transformers_common_tests"
STAND_INS = {
    "generation/test_utils.py": '"""Stand-in: tests/generation is not in the sdist."""\n\n\n'
    "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": '"""Stand-in: tests/exporters is not in the sdist."""\n\n\n'
    "class ExportTesterMixin:\n    pass\n",
}


class CommonTestsUnavailable(RuntimeError):
    """The transformers sdist could not be obtained; the message says how to provide it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SAISA_CACHE_DIR", Path.home() / ".cache" / "modeling_saisa"))


def how_to_provide(version: str) -> str:
    return (
        f"transformers' common tests need the transformers {version} source distribution: run "
        f"`python -m pip download --no-deps --no-binary :all: transformers=={version} -d {cache_dir()}` "
        f"or set SAISA_TRANSFORMERS_SDIST to a transformers-{version}.tar.gz"
    )


def sdist_path(version: str = transformers.__version__) -> Path:
    """The sdist tarball of `version`: from the environment, the cache, or pip download (in that order)."""
    explicit = os.environ.get("SAISA_TRANSFORMERS_SDIST")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CommonTestsUnavailable(
                f"SAISA_TRANSFORMERS_SDIST={explicit} is not a file; " + how_to_provide(version)
            )
        return path
    cached = cache_dir() / f"transformers-{version}.tar.gz"
    if cached.is_file():
        return cached
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [f"transformers=={version}", "-d", download, "-q"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        tarballs = list(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise CommonTestsUnavailable(
                f"pip download failed ({result.stderr.strip()[-300:]}); " + how_to_provide(version)
            )
        os.replace(tarballs[0], cached)  # atomic within the cache folder
    return cached


def extract_tests(tarball: Path, version: str) -> Path:
    """Extract `transformers-<version>/tests/*.py` (top level only) as package PACKAGE; return its parent folder."""
    root = cache_dir() / f"transformers-{version}-common-tests"
    if (root / PACKAGE / "test_modeling_common.py").is_file():
        return root
    cache_dir().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir()))
    package = staging / PACKAGE
    package.mkdir()
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(tarball) as archive:
        for member in archive.getmembers():
            relative = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if member.isfile() and relative.endswith(".py") and "/" not in relative:
                (package / relative).write_bytes(archive.extractfile(member).read())
    if not (package / "test_modeling_common.py").is_file():
        shutil.rmtree(staging)
        raise CommonTestsUnavailable(f"{tarball} has no {prefix}test_modeling_common.py; " + how_to_provide(version))
    (package / "__init__.py").touch()
    for relative, source in STAND_INS.items():
        target = package / relative
        target.parent.mkdir(exist_ok=True)
        (target.parent / "__init__.py").touch()
        target.write_text(source)
    try:
        os.replace(staging, root)  # atomic; a concurrent extraction that won first is equally good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def load_test_modeling_common() -> ModuleType:
    """transformers' `tests/test_modeling_common.py` for the installed version (raises CommonTestsUnavailable)."""
    version = transformers.__version__
    root = extract_tests(sdist_path(version), version)
    if str(root) not in sys.path:
        sys.path.append(str(root))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
