"""Start-up time and idle memory of `vlserve serve`, per process, for one or more source trees.

For each tree (alternating, ``--runs`` times) start ``python -m server.cli serve`` on a
free loopback port with that tree first on ``PYTHONPATH``, time until ``/ready`` answers
200, wait ``--settle`` seconds, read ``/proc/PID/smaps_rollup`` of the server and every
process under it, stop it (SIGINT, killed after 30 s) and print one table row per run:

    python -m bench.idle_memory before=/path/to/old/worktree after=.

PSS divides shared pages among the processes that map them (a library mapped by four
processes counts a quarter in each); the RSS sum counts them once per process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

KINDS = (("worker_main", "engine"), ("lane_process", "probe lane"), ("multiprocessing", "prep + tracker"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", metavar="LABEL=DIR", help="a vlserve source tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between /ready and the reading")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for /ready")
    args = parser.parse_args(argv)
    trees = [_tree(text) for text in args.trees]
    print("| tree | run | start-up to /ready, s | whole tree PSS / RSS-sum MiB | PSS MiB by process |")
    print("|---|---:|---:|---:|---|")
    for run in range(args.runs):
        for label, directory in trees:
            ready, memory = measure(directory, args.timeout, args.settle)
            total_pss = sum(pss for pss, _ in memory.values())
            total_rss = sum(rss for _, rss in memory.values())
            parts = ", ".join(f"{kind} {pss:,.0f}" for kind, (pss, _) in memory.items())
            print(f"| {label} | {run + 1} | {ready:.1f} | {total_pss:,.0f} / {total_rss:,.0f} | {parts} |", flush=True)
    return 0


def measure(directory: Path, timeout: float, settle: float) -> tuple[float, dict[str, tuple[float, float]]]:
    """Seconds until ``/ready`` is 200, and (PSS, RSS) MiB summed per kind of process."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=directory,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = _wait_ready(port, started, timeout, server)
        time.sleep(settle)
        memory: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for pid in [server.pid, *_descendants(server.pid)]:
            reading = _rollup(pid)
            if reading is not None:
                kind = _kind(pid)
                memory[kind][0] += reading[0]
                memory[kind][1] += reading[1]
        return ready, {kind: (pss, rss) for kind, (pss, rss) in memory.items()}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_ready(port: int, started: float, timeout: float, server: subprocess.Popen) -> float:
    while time.monotonic() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"/ready did not answer 200 within {timeout} s")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[parent].append(int(entry.name))
    found, stack = [], list(children[pid])
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children[child])
    return found


def _rollup(pid: int) -> tuple[float, float] | None:
    """(PSS, RSS) MiB of ``pid``, or ``None`` if it is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    fields = {line.split()[0]: int(line.split()[1]) / 1024 for line in lines[1:] if line.split()}
    return fields.get("Pss:", 0.0), fields.get("Rss:", 0.0)


def _kind(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for marker, kind in KINDS:
        if marker in command:
            return kind
    return "server" if "server.cli" in command else command[:40]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tree(text: str) -> tuple[str, Path]:
    label, _, directory = text.partition("=")
    path = Path(directory or label).resolve()
    if not (path / "server" / "cli.py").is_file():
        raise SystemExit(f"{path} is not a vlserve source tree")
    return (label if directory else path.name), path


if __name__ == "__main__":
    raise SystemExit(main())
