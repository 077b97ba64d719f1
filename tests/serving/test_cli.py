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
    port, http_port = helpers.free_port(), helpers.free_port()
    stderr_path = tmp_path / "up.stderr"
    with open(stderr_path, "wb") as stderr:
        up = subprocess.Popen([*NEXTSERVE, "up", "--checkpoint", str(tiny_checkpoint), "--shards", "2",
                               "--port", str(port), "--http-port", str(http_port), "--startup-timeout", "120",
                               "--kv-cache-memory", "1MiB"],
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
        # a session: the second turn sends only its new tokens, and equals the whole history sent at once
        router = ["--router", f"127.0.0.1:{port}", "--json", "--max-tokens", "4", "--temperature", "0"]
        turn1 = json.loads(_run(["generate", "--prompt-ids", "1,2,3", "--session-id", "cli-chat", *router]))
        turn2 = json.loads(_run(["generate", "--prompt-ids", "7,8", "--session-id", "cli-chat", "--append-to-session",
                                 *router]))
        history = ",".join(str(t) for t in [1, 2, 3, *turn1["token_ids"], 7, 8])
        assert turn2["token_ids"] == json.loads(_run(["generate", "--prompt-ids", history, *router]))["token_ids"]

        # the printed curl line works as printed
        curl = _read_line_containing(up, "try: curl", timeout=10)
        assert curl is not None and f"http://127.0.0.1:{http_port}/v1/chat/completions" in curl
        answer = subprocess.run(["bash", "-c", curl.strip().removeprefix("try: ")], capture_output=True, text=True,
                                timeout=120)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["object"] == "chat.completion"

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


def test_generate_with_token_ids_needs_no_tokenizer_on_a_save_pretrained_checkpoint(tiny_checkpoint, tmp_path):
    """transformers' save_pretrained writes weights and configs, no tokenizer: ids in, --json out still work."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = tmp_path / "saved"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).save_pretrained(saved)
    assert not (saved / "tokenizer.json").exists()
    args = ["generate", "--prompt-ids", "1,2,3", "--max-tokens", "6", "--temperature", "0", "--json"]
    without = json.loads(_run([*args, "--checkpoint", str(saved)]))
    with_tokenizer = json.loads(_run([*args, "--checkpoint", str(tiny_checkpoint)]))
    assert without == {"token_ids": with_tokenizer["token_ids"], "finish_reason": with_tokenizer["finish_reason"]}
    assert len(without["token_ids"]) == 6 or without["finish_reason"] == "stop"

    for needs_text in (["generate", "hello", "--json"], ["generate", "--prompt-ids", "1,2"]):
        done = subprocess.run([*NEXTSERVE, *needs_text, "--checkpoint", str(saved)], capture_output=True, text=True,
                              env=ENV, timeout=120)
        assert done.returncode == 2 and "no tokenizer.json" in done.stderr and "--prompt-ids" in done.stderr
    help_text = subprocess.run([*NEXTSERVE, "generate", "--help"], capture_output=True, text=True, env=ENV).stdout
    assert "no tokenizer is needed" in " ".join(help_text.split())
