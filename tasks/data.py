"""Locating data files: an explicit path, then the folder in $TITANS_BENCH_DATA, then a data folder
(`--data-dir`, default ./data), then the download cache, then a download from the canonical source into
that cache. Every file found or fetched is checked against its sha256 before use; nothing is ever
rewritten (the ETT licence forbids redistributing modified copies: normalisation happens in memory)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ENV_DIR = "TITANS_BENCH_DATA"
ENV_CACHE = "TITANS_BENCH_CACHE"
ENV_OFFLINE = "TITANS_BENCH_OFFLINE"  # set to 1 to never try a download
DEFAULT_DIR = Path("data")


@dataclass(frozen=True)
class DataFile:
    name: str
    url: str
    sha256: str


FILES = {
    "etth1": DataFile("ETTh1.csv", "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv",
                      "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"),
    "etth2": DataFile("ETTh2.csv", "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh2.csv",
                      "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b"),
    "tinyshakespeare": DataFile(
        "tinyshakespeare.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


class DataError(RuntimeError):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "titans-bench"))


def verified(path: Path, spec: DataFile) -> Path:
    got = sha256(path)
    if got != spec.sha256:
        raise DataError(f"{path} is corrupt or not the expected {spec.name}: sha256 {got}, expected {spec.sha256}. "
                        f"Replace it with the file from {spec.url} (or delete it to download again).")
    return path


def download(spec: DataFile, url: str, timeout: float = 20.0) -> Path:
    target = cache_dir() / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
        except (urllib.error.URLError, OSError) as err:
            Path(tmp.name).unlink(missing_ok=True)
            raise DataError(f"download of {url} failed: {err}") from err
    try:
        verified(Path(tmp.name), spec)
    except DataError:
        Path(tmp.name).unlink(missing_ok=True)
        raise DataError(f"download of {url} did not match the sha256 {spec.sha256}; nothing was kept") from None
    os.replace(tmp.name, target)
    return target


def locate(key: str, path: str | Path | None = None, data_dir: str | Path | None = None,
           url: str | None = None) -> Path:
    """The verified local path of a known data file, downloading it into the cache if needed."""
    if key not in FILES:
        raise DataError(f"unknown data file {key!r}; known: {', '.join(FILES)}")
    spec = FILES[key]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{spec.name}: the explicit path {p} does not exist")
        return verified(p, spec)
    candidates = []
    if os.environ.get(ENV_DIR):
        candidates.append(Path(os.environ[ENV_DIR]) / spec.name)
    candidates.append(Path(data_dir or DEFAULT_DIR) / spec.name)
    candidates.append(cache_dir() / spec.name)
    for candidate in candidates:
        if candidate.is_file():
            return verified(candidate, spec)
    looked = ", ".join(str(c) for c in candidates)
    if os.environ.get(ENV_OFFLINE) == "1":
        reason = f"downloads are off (${ENV_OFFLINE}=1)"
    else:
        try:
            return download(spec, url or spec.url)
        except DataError as err:
            reason = str(err)
    raise DataError(f"{spec.name} not found. Looked in: {looked}; {reason}. Fix: pass --data-dir FOLDER (a folder "
                    f"holding {spec.name}), set ${ENV_DIR}, or download {spec.url} into {cache_dir()}.")
