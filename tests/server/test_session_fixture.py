"""The pytest plugin's session-scoped server, used from a user's test suite run as a real
pytest process: started once, shared by trio, asyncio and plain tests, stopped at the end."""

from __future__ import annotations

import importlib.metadata
import textwrap

import trio

from tests.server.launch import REPO, launched

RUN_TIMEOUT_S = 180

CONFTEST = """
import pytest

from server.app import open_default_runtime

OPENED = []


@pytest.fixture(scope="session")
def vlserve_session_runtime_factory():
    def factory(config):
        OPENED.append(config.model)
        return open_default_runtime(config)

    return factory
"""

USER_TESTS = """
import asyncio

import httpx
import openai
import pytest
import trio

from conftest import OPENED

URLS = []


@pytest.mark.trio
async def test_from_trio(vlserve_session_url):
    trio.lowlevel.current_trio_token()  # really in a trio run
    async with httpx.AsyncClient(base_url=vlserve_session_url) as http:
        assert (await http.get("/ready")).status_code == 200
    URLS.append(vlserve_session_url)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_from_asyncio(vlserve_session_server):
    asyncio.get_running_loop()  # really in an asyncio loop
    client = openai.AsyncOpenAI(base_url=vlserve_session_server.url + "/v1", api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(
        model=vlserve_session_server.config.model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
    )
    await client.close()
    assert chat.choices[0].message.content is not None
    URLS.append(vlserve_session_server.url)


def test_from_plain_code(vlserve_session_url):
    assert httpx.get(vlserve_session_url + "/health").status_code == 200
    URLS.append(vlserve_session_url)


def test_one_server_for_the_session(vlserve_session_url):
    assert URLS == [vlserve_session_url] * 3
    assert len(OPENED) == 1
"""


def _plugin_is_installed() -> bool:
    return any(ep.name == "vlserve" for ep in importlib.metadata.entry_points(group="pytest11"))


async def test_session_server_is_shared_by_trio_asyncio_and_plain_tests(tiny_model_dir, tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    plugin = [] if _plugin_is_installed() else ["-p", "server.pytest_plugin"]
    args = ["-m", "pytest", *plugin, "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(tmp_path)]
    async with launched(args, {"VLSERVE_MODEL": str(tiny_model_dir)}) as run:
        with trio.fail_after(RUN_TIMEOUT_S):
            returncode = await run.process.wait()
        await trio.sleep(0.1)
    assert returncode == 0, run.log()
    assert "4 passed" in run.log()


def _readme_example(first_line: str) -> str:
    """The README's Python code block that starts with ``first_line``."""
    readme = (REPO / "README.md").read_text()
    for block in readme.split("```python\n")[1:]:
        code = block.split("```", 1)[0]
        if code.startswith(first_line):
            return code
    raise AssertionError(f"no README example starting with {first_line!r}")


async def test_readme_fixture_examples_run(tiny_model_dir, tmp_path):
    """Both README examples, as written, pass in a user's suite (trio mode on, as the
    function-scoped example says)."""
    (tmp_path / "test_with_vlserve.py").write_text(_readme_example("# test_with_vlserve.py"))
    (tmp_path / "test_shared_server.py").write_text(_readme_example("# test_shared_server.py"))
    plugin = [] if _plugin_is_installed() else ["-p", "server.pytest_plugin"]
    args = [
        "-m", "pytest", *plugin, "-o", "trio_mode=true", "-p", "no:cacheprovider", "-q",
        "--rootdir", str(tmp_path), str(tmp_path),
    ]  # fmt: skip
    async with launched(args, {"VLSERVE_MODEL": str(tiny_model_dir)}) as run:
        with trio.fail_after(RUN_TIMEOUT_S):
            returncode = await run.process.wait()
        await trio.sleep(0.1)
    assert returncode == 0, run.log()
    assert "3 passed" in run.log()
