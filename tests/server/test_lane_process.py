"""The probe lane in a process of its own (server/http_path/lane_process.py) and the board
it reads the probes' facts from (server/http_path/probe_board.py).

The lane's protocol behaviour (what it answers, what it hands over, keep-alive limits,
replies equal to the loop's) is tested for both placements in
``tests/server/test_probe_lane.py``; this file tests what only the process has: facts
that cross a process boundary, the process's life tied to the server's, and a server that
survives its death.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import replace

import pytest
import trio

from server.config import ServerConfig
from server.http_path.probe_board import ProbeBoard
from server.lifecycle import Phase
from server.probes import ProbeFacts
from tests.server.rawhttp import connect, read_one_response, request_bytes, status_of
from tests.server.test_probe_lane import _address, _answered, _blocking_probe, lane_server

# -- the board -------------------------------------------------------------------------


def _reader_of(board: ProbeBoard) -> ProbeBoard:
    """A second mapping of ``board``'s memory, as the lane process has."""
    return ProbeBoard(os.dup(board.fileno()))


def test_a_new_board_reads_loading_healthy_and_not_stalled():
    board = ProbeBoard.create()
    try:
        assert board.facts() == ProbeFacts(Phase.LOADING, 0.0, 0.0, True)
        assert board.probe_counts() == (0, 0)
    finally:
        board.close()


def test_published_facts_read_back_in_another_mapping_and_the_stall_grows_from_the_stamp():
    """The reader gets the published phase, engine health and stall limit; the loop's stall
    is not copied but derived: 0 while the last stamp is within ``interval``, then the time
    it is overdue."""
    board = ProbeBoard.create()
    reader = _reader_of(board)
    try:
        board.publish(ProbeFacts(Phase.DRAINING, loop_stalled_for=9.0, stall_limit=1.5, engine_healthy=False), 5.0)
        facts = reader.facts()
        assert (facts.phase, facts.stall_limit, facts.engine_healthy) == (Phase.DRAINING, 1.5, False)
        assert facts.loop_stalled_for == 0.0
        board.publish(ProbeFacts(Phase.READY, 0.0, 1.5, True), 0.01)
        time.sleep(0.06)
        facts = reader.facts()
        assert facts.phase is Phase.READY and facts.engine_healthy
        assert 0.04 <= facts.loop_stalled_for < 5.0
    finally:
        reader.close()
        board.close()


def test_a_read_never_spins_on_a_write_left_half_done():
    """Invariant: the lane never spins on the board. With the sequence left odd (a writer
    stopped between its two stores), ``facts`` returns the last consistent read, its
    stall still growing from that read's stamp."""
    board = ProbeBoard.create()
    reader = _reader_of(board)
    raw = mmap.mmap(board.fileno(), 64)
    try:
        board.publish(ProbeFacts(Phase.READY, 0.0, 1.0, True), 0.01)
        assert reader.facts().phase is Phase.READY
        sequence = struct.unpack_from("<Q", raw)[0]
        struct.pack_into("<Q", raw, 0, sequence + 1)  # a write begun, never finished
        time.sleep(0.05)
        facts = reader.facts()
        assert facts.phase is Phase.READY and facts.loop_stalled_for >= 0.03
    finally:
        raw.close()
        reader.close()
        board.close()


def test_probe_counts_written_by_the_lane_are_read_by_the_server():
    board = ProbeBoard.create()
    lane = _reader_of(board)
    try:
        lane.count_probe(True)
        lane.count_probe(True)
        lane.count_probe(False)
        assert board.probe_counts() == (2, 1)
    finally:
        lane.close()
        board.close()


# -- the process -----------------------------------------------------------------------


def _lane_pids() -> list[int]:
    """Processes whose parent is this one and whose command runs the lane."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue  # gone meanwhile
        if parent == me and b"server.http_path.lane_process" in command:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def process_config(vlserve_config: ServerConfig) -> ServerConfig:
    return replace(vlserve_config, probe_lane_process=True)


async def test_the_lane_process_exits_with_the_server(process_config, fake_factory):
    """Invariant: the lane process lives exactly as long as the server: one is running
    while the server serves (and answers its probes: 0 passes), none once the server has
    stopped, and its listener refuses connections then."""
    async with lane_server(process_config, fake_factory) as (server, pass_log):
        url = server.url
        stream = await connect(url)
        async with stream:
            await stream.send_all(request_bytes("GET", "/health"))
            assert status_of(await read_one_response(stream, timeout=10)) == 200
        pids = _lane_pids()
        assert len(pids) == 1
        assert _answered(pass_log) == {"lane": 1, "loop": 0}
    assert not _alive(pids[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(_address(url), timeout=5).close()


async def test_a_phase_change_reaches_the_lane_before_the_next_probe(process_config, fake_factory):
    """Invariant: the lane never answers from a phase older than the server's: right after
    the drain begins, its ``/ready`` is 503 (``draining``)."""
    async with lane_server(process_config, fake_factory) as (server, pass_log):
        stream = await connect(server.url)
        async with stream:
            await stream.send_all(request_bytes("GET", "/ready"))
            assert status_of(await read_one_response(stream, timeout=10)) == 200
            server.state.lifecycle.withdraw_readiness()
            await stream.send_all(request_bytes("GET", "/ready"))
            reply = await read_one_response(stream, timeout=10)
        assert status_of(reply) == 503 and b'"draining"' in reply
        assert _answered(pass_log) == {"lane": 2, "loop": 0}


async def test_a_dead_lane_process_fails_only_its_own_connections(process_config, fake_factory):
    """Invariant: a dead lane process fails only its own work. Killed, the keep-alive probe
    connection it held closes; the server takes its listener back: a fresh probe and an
    API request on new connections are answered by the event loop."""
    async with lane_server(process_config, fake_factory) as (server, pass_log):
        held = socket.create_connection(_address(server.url), timeout=10)
        try:
            assert await trio.to_thread.run_sync(_blocking_probe, held) == 200
            [pid] = _lane_pids()
            os.kill(pid, signal.SIGKILL)
            assert await trio.to_thread.run_sync(held.recv, 1) == b""
        finally:
            held.close()
        with trio.fail_after(10):
            while _alive(pid):  # reaped by the server
                await trio.sleep(0.01)
        for method, path in (("GET", "/health"), ("GET", "/v1/models")):
            stream = await connect(server.url)
            async with stream:
                await stream.send_all(request_bytes(method, path))
                assert status_of(await read_one_response(stream, timeout=10)) == 200
        assert _answered(pass_log) == {"lane": 1, "loop": 1}


async def test_a_lane_process_that_cannot_start_leaves_the_listener_to_the_loop(
    process_config, fake_factory, monkeypatch
):
    """Invariant: no lane process, no lost listener. When the process cannot be started
    (here: no Python at ``sys.executable``), the server accepts on the listener itself and
    answers probes and requests on its loop."""
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    async with lane_server(process_config, fake_factory) as (server, pass_log):
        for path in ("/health", "/v1/models"):
            stream = await connect(server.url)
            async with stream:
                await stream.send_all(request_bytes("GET", path))
                assert status_of(await read_one_response(stream, timeout=10)) == 200
        assert _lane_pids() == []
        assert _answered(pass_log) == {"lane": 0, "loop": 1}
