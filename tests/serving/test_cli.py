"""`nextserve up` as a user runs it, and `nextserve generate --router` against it."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

NEXTSERVE = [sys.executable, "-m", "nextserve.cli.main"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_up_serves_generate_matches_in_process_and_sigterm_stops_everything(helpers, tiny_checkpoint, tmp_path):
    port = helpers.free_port()
    stderr_path = tmp_path / "up.stderr"
    with open(stderr_path, "wb") as stderr:
        up = subprocess.Popen([*NEXTSERVE, "up", "--checkpoint", str(tiny_checkpoint), "--shards", "2",
                               "--port", str(port), "--startup-timeout", "120", "--kv-cache-memory", "1MiB"],
                              stdout=subprocess.PIPE, stderr=stderr, env=ENV, text=True)
    try:
        banner = _read_line_containing(up, "nextserve is up", timeout=150)
        assert banner is not None, f"up did not come up:\n{stderr_path.read_text()[-3000:]}"
        assert f"127.0.0.1:{port}" in banner
        sizing = _read_line_containing(up, "KV cache", timeout=10)  # the router's pools, as it sized them
        assert sizing is not None and "1.0 MiB" in sizing and "tokens" in sizing and "sequences" in sizing
        workdir = re.search(r"logs in (\S+)\)", stderr_path.read_text()).group(1)

        args = ["generate", "--prompt-ids", "1,2,3", "--max-tokens", "6", "--temperature", "0"]
        remote = _run([*args, "--router", f"127.0.0.1:{port}", "--json"])
        local = _run([*args, "--checkpoint", str(tiny_checkpoint), "--json"])
        assert json.loads(remote) == json.loads(local)
        streamed = _run([*args, "--router", f"127.0.0.1:{port}"])
        assert streamed == json.loads(local)["text"] + "\n"

        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        assert _processes_mentioning(workdir) == []  # no orphaned worker or router
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)


def _run(args: list[str]) -> str:
    done = subprocess.run([*NEXTSERVE, *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _read_line_containing(process: subprocess.Popen, needle: str, timeout: float) -> str | None:
    found = []

    def read():
        for line in process.stdout:
            if needle in line:
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids
