"""The three ways to launch vlserve, as real processes: ``vlserve serve``, plain hypercorn,
and the pytest plugin."""

from __future__ import annotations

import importlib.metadata
import json
import signal
import textwrap
import tomllib

import httpx
import pytest
import trio

from tests.server.launch import REPO, launched, wait_ready
from tests.server.sse_client import parse_events

START_TIMEOUT_S = 120


def test_pyproject_declares_the_command_and_the_plugin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["vlserve"] == "server.cli:main"
    assert project["entry-points"]["pytest11"]["vlserve"] == "server.pytest_plugin"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_vlserve_serve_drains_on_signal_and_exits_0(tiny_model_dir, signum):
    args = ["-m", "server.cli", "serve", "--port", "0", "--drain-timeout", "30"]
    async with launched(args, {"VLSERVE_MODEL": str(tiny_model_dir)}) as server:
        url = (await server.wait_for_line(r"listening on (http://\S+)", START_TIMEOUT_S))[1]
        await wait_ready(url, START_TIMEOUT_S)
        loaded = await server.wait_for_line(r"loaded model .* \(device=(\S+), dtype=(\S+),.* in", 5)
        assert loaded[1] == "cpu" and loaded[2] == "float32"
        # the server process runs no model: torch's libraries are not even mapped
        maps = await trio.Path(f"/proc/{server.process.pid}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 120,
            "ignore_eos": True,
            "stream": True,
        }
        data = b""
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for chunk in response.aiter_bytes():
                    if not data and b'"content"' in chunk:
                        server.process.send_signal(signum)  # mid-stream
                    data += chunk
        with trio.fail_after(30):
            returncode = await server.process.wait()
    events, done = parse_events(data.decode())
    assert done, server.log()
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content") is not None) > 1
    assert returncode == 0, server.log()
    assert "draining" in server.log()


async def test_second_signal_stops_at_once_with_status_1(tiny_model_dir):
    args = ["-m", "server.cli", "serve", "--port", "0", "--drain-timeout", "60"]
    async with launched(args, {"VLSERVE_MODEL": str(tiny_model_dir)}) as server:
        url = (await server.wait_for_line(r"listening on (http://\S+)", START_TIMEOUT_S))[1]
        await wait_ready(url, START_TIMEOUT_S)
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
        data = b""
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                with trio.fail_after(20), pytest.raises(httpx.RemoteProtocolError):
                    async for chunk in response.aiter_bytes():  # cut mid-stream
                        if not data and b'"content"' in chunk:
                            server.process.send_signal(signal.SIGTERM)
                            await server.wait_for_line("draining", 5)
                            server.process.send_signal(signal.SIGTERM)
                        data += chunk
        with trio.fail_after(20):
            returncode = await server.process.wait()
    assert returncode == 1, server.log()
    assert b"[DONE]" not in data
    assert "stopping now" in server.log()


async def test_plain_hypercorn_serves_the_app_factory(tiny_model_dir):
    args = [
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--bind",
        "127.0.0.1:0",
        "server.app:create_app()",
    ]
    env = {"VLSERVE_MODEL": str(tiny_model_dir), "VLSERVE_API_KEY": "sekrit"}
    async with launched(args, env) as server:
        url = (await server.wait_for_line(r"Running on (http://\S+)", START_TIMEOUT_S))[1]
        await wait_ready(url, START_TIMEOUT_S)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            assert (await http.get("/v1/models")).status_code == 401
            headers = {"Authorization": "Bearer sekrit"}
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            response = await http.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == tiny_model_dir.name
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await server.process.wait()


def _plugin_is_installed() -> bool:
    return any(ep.name == "vlserve" for ep in importlib.metadata.entry_points(group="pytest11"))


async def test_pytest_plugin_fixtures_in_a_user_test_suite(tiny_model_dir, tmp_path):
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
        import httpx

        async def test_uses_vlserve(vlserve_client, vlserve_base_url, vlserve_server):
            models = await vlserve_client.models.list()
            assert models.data[0].id == vlserve_server.state.config.model_name
            chat = await vlserve_client.chat.completions.create(
                model=models.data[0].id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert chat.choices[0].message.content is not None
            async with httpx.AsyncClient(base_url=vlserve_base_url) as http:
                assert (await http.get("/ready")).status_code == 200
        """
        )
    )
    plugin = [] if _plugin_is_installed() else ["-p", "server.pytest_plugin"]
    args = [
        "-m",
        "pytest",
        *plugin,
        "-o",
        "trio_mode=true",
        "-p",
        "no:cacheprovider",
        "-q",
        "--rootdir",
        str(tmp_path),
        str(tmp_path / "test_user.py"),
    ]
    async with launched(args, {"VLSERVE_MODEL": str(tiny_model_dir)}) as run:
        with trio.fail_after(START_TIMEOUT_S):
            returncode = await run.process.wait()
        await trio.sleep(0.1)
    assert returncode == 0, run.log()
    assert "1 passed" in run.log()


@pytest.mark.parametrize(("lane_flag", "passes"), [("--probe-lane", "0"), ("--no-probe-lane", "1")])
async def test_vlserve_serve_writes_probe_passes_when_asked(tiny_model_dir, tmp_path, lane_flag, passes):
    """With VLSERVE_PROBE_PASSES_FILE set, ``vlserve serve`` counts each probe's scheduler
    passes and writes them at exit. With the probe lane (the default) every probe,
    keep-alive or on a fresh connection, is answered off the event loop: 0 passes. Without
    it, every probe is answered in the first pass that can see its bytes: 1 pass."""
    out = tmp_path / "passes.json"
    args = ["-m", "server.cli", "serve", "--port", "0", lane_flag]
    env = {"VLSERVE_MODEL": str(tiny_model_dir), "VLSERVE_PROBE_PASSES_FILE": str(out)}
    async with launched(args, env) as server:
        url = (await server.wait_for_line(r"listening on (http://\S+)", START_TIMEOUT_S))[1]
        await wait_ready(url, START_TIMEOUT_S)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(3):
                assert (await http.get("/health")).status_code == 200
        for _ in range(3):
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                assert (await http.get("/health")).status_code == 200
        server.process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await server.process.wait() == 0, server.log()
    summary = json.loads(out.read_text())
    assert summary["keep_alive"]["probes"] >= 2
    assert summary["keep_alive"]["histogram"] == {passes: summary["keep_alive"]["probes"]}
    assert summary["fresh"]["probes"] >= 4
    assert summary["fresh"]["histogram"] == {passes: summary["fresh"]["probes"]}
