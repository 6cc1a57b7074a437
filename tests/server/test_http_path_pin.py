"""``server.http_path`` is written against hypercorn 0.18.0's internals: fail loudly if they change.

``server.http_path`` subclasses or copies the hypercorn functions below (or relies on the
order in which they send events). Each is fingerprinted by its source; an upgrade that
changes any of them fails here, naming it, so the subclass is reviewed against the new
code (bench/README.md says how to count passes again) before the pin in pyproject.toml is
moved.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import tomllib
from pathlib import Path

import pytest

from server.http_path.connection import FastTCPServer
from server.http_path.protocol import FastH11Protocol, FastProtocolWrapper
from server.http_path.task_group import NoWaitTaskGroup

PINNED_VERSION = "0.18.0"
REPO = Path(__file__).resolve().parents[2]

# "module:qualified.name" -> sha256 of its source (first 16 hex digits), hypercorn 0.18.0
FINGERPRINTS = {
    "hypercorn.trio.run:worker_serve": "8dc8347a9fc357ca",
    "hypercorn.trio.tcp_server:TCPServer.__init__": "4c1d42457bc197b2",
    "hypercorn.trio.tcp_server:TCPServer.run": "fd34b021d1a86c98",
    "hypercorn.trio.tcp_server:TCPServer.protocol_send": "225856426bff7be0",
    "hypercorn.trio.tcp_server:TCPServer._read_data": "7ca747d922c65cf1",
    "hypercorn.trio.tcp_server:TCPServer._idle_timeout": "210ce1014d98e1cb",
    "hypercorn.trio.task_group:TaskGroup.spawn_app": "b4c1131427529801",
    "hypercorn.trio.task_group:_handle": "06081a56a9930825",
    "hypercorn.protocol:ProtocolWrapper.__init__": "df25e181b9e2e64d",
    "hypercorn.protocol.h11:H11Protocol.__init__": "c7c989fd6a352626",
    "hypercorn.protocol.h11:H11Protocol.stream_send": "56a36254a368d71a",
    "hypercorn.protocol.h11:H11Protocol._create_stream": "a2338a57ab343908",
    "hypercorn.protocol.h11:H11Protocol._handle_events": "bd4a76b2837e8722",
    "hypercorn.protocol.h11:H11Protocol._maybe_recycle": "3ac53f52bc4e65de",
    "hypercorn.protocol.http_stream:HTTPStream.app_send": "c806044b99736985",
    "hypercorn.protocol.http_stream:HTTPStream.handle": "6ed2e34c5e708c6a",
}


def _resolve(target: str) -> object:
    module_name, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def test_installed_hypercorn_is_the_pinned_version():
    assert importlib.metadata.version("hypercorn") == PINNED_VERSION


def test_pyproject_pins_that_version():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"hypercorn=={PINNED_VERSION}" in dependencies


@pytest.mark.parametrize("target", sorted(FINGERPRINTS))
def test_hypercorn_internal_is_unchanged(target):
    source = inspect.getsource(_resolve(target))  # type: ignore[arg-type]
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == FINGERPRINTS[target], (
        f"{target} changed since hypercorn {PINNED_VERSION}: review server.http_path against it"
    )


@pytest.mark.parametrize(
    ("ours", "theirs", "method"),
    [
        (FastTCPServer, "hypercorn.trio.tcp_server:TCPServer", "protocol_send"),
        (FastTCPServer, "hypercorn.trio.tcp_server:TCPServer", "_read_data"),
        (FastTCPServer, "hypercorn.trio.tcp_server:TCPServer", "run"),
        (FastTCPServer, "hypercorn.trio.tcp_server:TCPServer", "_close"),
        (FastH11Protocol, "hypercorn.protocol.h11:H11Protocol", "stream_send"),
        (FastH11Protocol, "hypercorn.protocol.h11:H11Protocol", "_create_stream"),
        (NoWaitTaskGroup, "hypercorn.trio.task_group:TaskGroup", "spawn_app"),
    ],
)
def test_overridden_methods_keep_hypercorns_signature(ours, theirs, method):
    base = _resolve(theirs)
    assert issubclass(ours, base)  # type: ignore[arg-type]
    theirs_signature = inspect.signature(getattr(base, method))
    ours_signature = inspect.signature(getattr(ours, method))
    assert list(ours_signature.parameters) == list(theirs_signature.parameters)


def test_protocol_wrapper_takes_hypercorns_arguments_first():
    base = list(inspect.signature(_resolve("hypercorn.protocol:ProtocolWrapper.__init__")).parameters)
    ours = list(inspect.signature(FastProtocolWrapper.__init__).parameters)
    assert ours[: len(base)] == base
