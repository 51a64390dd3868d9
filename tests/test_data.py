"""Locating data files: order of places, checksum verification, clear errors, download over loopback."""

import hashlib
import http.server
import threading
from functools import partial

import pytest

from tasks import data
from tasks.data import DataError, DataFile, locate

CONTENT = b"date,a\n2020-01-01 00:00:00,1.0\n"


@pytest.fixture
def fake_file(monkeypatch, tmp_path):
    spec = DataFile("fake.csv", "http://127.0.0.1:9/fake.csv", hashlib.sha256(CONTENT).hexdigest())
    monkeypatch.setitem(data.FILES, "fake", spec)
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    monkeypatch.setenv(data.ENV_OFFLINE, "1")
    return spec


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_explicit_path_beats_env_folder_beats_data_dir(fake_file, tmp_path, monkeypatch):
    for name in ("explicit", "env", "dir"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "fake.csv").write_bytes(CONTENT)
    monkeypatch.setenv(data.ENV_DIR, str(tmp_path / "env"))
    assert locate("fake", path=tmp_path / "explicit" / "fake.csv", data_dir=tmp_path / "dir").parent.name == "explicit"
    assert locate("fake", data_dir=tmp_path / "dir").parent.name == "env"
    monkeypatch.delenv(data.ENV_DIR)
    assert locate("fake", data_dir=tmp_path / "dir").parent.name == "dir"


def test_corrupt_file_is_refused_naming_both_checksums(fake_file, tmp_path):
    (tmp_path / "fake.csv").write_bytes(CONTENT + b"tampered")
    with pytest.raises(DataError, match=f"expected {fake_file.sha256}"):
        locate("fake", data_dir=tmp_path)


def test_missing_file_says_where_it_looked_and_how_to_fix(fake_file, tmp_path):
    with pytest.raises(DataError) as err:
        locate("fake", data_dir=tmp_path / "nowhere")
    text = str(err.value)
    assert "nowhere/fake.csv" in text and "cache" in text and "--data-dir" in text and "downloads are off" in text


def test_download_over_loopback_lands_verified_in_the_cache(fake_file, server, monkeypatch, tmp_path):
    root, base = server
    (root / "fake.csv").write_bytes(CONTENT)
    monkeypatch.delenv(data.ENV_OFFLINE)
    got = locate("fake", data_dir=tmp_path / "empty", url=f"{base}/fake.csv")
    assert got == tmp_path / "cache" / "fake.csv" and got.read_bytes() == CONTENT
    assert locate("fake", data_dir=tmp_path / "empty", url=f"{base}/gone.csv") == got  # the cache now serves it


def test_corrupt_download_is_not_kept(fake_file, server, monkeypatch, tmp_path):
    root, base = server
    (root / "fake.csv").write_bytes(b"not the file")
    monkeypatch.delenv(data.ENV_OFFLINE)
    with pytest.raises(DataError, match="did not match the sha256"):
        locate("fake", data_dir=tmp_path / "empty", url=f"{base}/fake.csv")
    assert not list((tmp_path / "cache").glob("*"))


def test_unknown_key_lists_the_known_files():
    with pytest.raises(DataError, match="known: etth1, etth2, tinyshakespeare"):
        locate("etth9")
