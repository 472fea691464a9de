"""Offline, a tfds download gives up in seconds with the one-line error that says what to do.

tfds' downloader retries a failed name resolution 10 times with exponential backoff (about
3.5 minutes); `data.batch` checks the download hosts first. Name resolution is faked here,
so these tests behave the same with or without a network.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from wrcor_jax.data import DataError, load_batch
from wrcor_jax.data import batch as batch_module


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name resolution fails at once, as on a machine without network; the hosts
    asked for are recorded."""
    asked: list[str] = []

    def fail(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    _no_proxy_settings(monkeypatch)
    return asked


def _no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.parametrize(
    ("dataset", "tfds_name", "host"),
    [
        ("cifar10", "cifar10", "www.cs.toronto.edu"),
        ("cifar100", "cifar100", "www.cs.toronto.edu"),
        ("imagenet16_120", "imagenet_resized/16x16", "www.image-net.org"),
    ],
)
def test_unresolvable_host_fails_fast_without_downloading(
    tfds, no_dns, monkeypatch, tmp_path: Path, dataset: str, tfds_name: str, host: str
) -> None:
    """No download is attempted (so no retry happens); the error is one line and says to
    pass --data or a prepared --data-dir."""
    real_data_source = tfds.data_source
    downloads: list[str] = []

    def data_source(name, *args, download=True, **kwargs):
        if download:
            downloads.append(name)
            raise AssertionError("tfds was asked to download")
        return real_data_source(name, *args, download=False, **kwargs)

    monkeypatch.setattr(tfds, "data_source", data_source)
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        load_batch(dataset, batch_size=4, data_dir=str(tmp_path))
    elapsed = time.monotonic() - start
    message = str(error.value)
    assert downloads == []
    assert no_dns == [host]  # one look-up per host, no retry
    assert "\n" not in message
    assert f"dataset {tfds_name} not found in data_dir {tmp_path}" in message
    assert f"cannot resolve {host}" in message
    assert "pass --data PATH.npz" in message and "--data-dir DIR" in message
    assert elapsed < 30  # generous: tfds' own retries take minutes


def test_prepared_dataset_needs_no_network(tfds, no_dns, tmp_path: Path) -> None:
    """A dataset tfds already has is read without any host check."""
    with tfds.testing.mock_data(num_examples=12):
        images, labels = load_batch("cifar10", batch_size=4, seed=0, data_dir=str(tmp_path))
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4,)
    assert no_dns == []


def test_download_false_checks_no_host(tfds, no_dns, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found in data_dir .* could not be downloaded"):
        load_batch("cifar10", batch_size=4, data_dir=str(tmp_path), download=False)
    assert no_dns == []


def test_a_hanging_resolver_is_abandoned_after_the_timeout(monkeypatch) -> None:
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    try:
        problem = batch_module._check_host("example.invalid", 443, timeout=0.2)
    finally:
        release.set()
    assert problem == "example.invalid:443 did not answer within 0.2 s; no network?"


def test_a_reachable_host_passes(monkeypatch) -> None:
    """Resolution and a TCP connection that succeed: no problem reported."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()

        def resolve(host, port, *args, **kwargs):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address)]

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        assert batch_module._unreachable_host(["https://data.example/a.tar.gz"], 10.0) is None


def test_a_refused_connection_is_reported(monkeypatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()  # closed below: nothing listens there any more

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address)]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    problem = batch_module._unreachable_host(["https://data.example/a.tar.gz"], 10.0)
    assert problem is not None and problem.startswith("cannot connect to data.example:443")


def test_the_proxy_is_checked_when_one_applies(monkeypatch) -> None:
    _no_proxy_settings(monkeypatch)
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert batch_module._connect_target(url) == ("www.cs.toronto.edu", 443)
    assert batch_module._connect_target("http://www.image-net.org/x.zip") == (
        "www.image-net.org",
        80,
    )
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    assert batch_module._connect_target(url) == ("proxy.internal", 3128)
    monkeypatch.setenv("no_proxy", "cs.toronto.edu")
    assert batch_module._connect_target(url) == ("www.cs.toronto.edu", 443)
    assert batch_module._connect_target("ftp://example.org/x") is None
