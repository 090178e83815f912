"""Clients in fresh processes, and the olah mirror server, for the Hub tests.

Clients run as subprocesses with ``HF_ENDPOINT`` pointing at a server on 127.0.0.1, ``HF_HOME`` in a temporary
folder, ``HF_HUB_DISABLE_XET=1`` and ``HF_HUB_OFFLINE`` lifted: huggingface_hub reads those once at import, so a fresh
process is how a user on another machine sees the server, and its whole output (logs, warnings) can be searched for
the token. Every server stops by itself (a watchdog) even if a test hangs.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
SERVER_LIFETIME_S = 300
CLIENT_TIMEOUT_S = 240
OLAH_START_TIMEOUT_S = 60
# olah with a watchdog thread: the process exits by itself after its lifetime, whatever happens to the test.
# Readiness is a byte on a pipe (argv[4]) written once uvicorn's startup has bound the socket: no polling.
OLAH_MAIN = (
    "import os, sys, threading\n"
    "threading.Thread(target=lambda: (threading.Event().wait(float(sys.argv[3])), os._exit(0)), daemon=True).start()\n"
    "ready = int(sys.argv[4])\n"
    "sys.argv = ['olah-cli', '-c', sys.argv[1], '--log-path', sys.argv[2]]\n"
    "import uvicorn\n"
    "_startup = uvicorn.Server.startup\n"
    "async def startup(self, sockets=None):\n"
    "    await _startup(self, sockets=sockets)\n"
    "    if self.started:\n"
    "        os.write(ready, b'1')\n"
    "uvicorn.Server.startup = startup\n"
    "from olah.server import cli\n"
    "cli()\n"
)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def client_env(tmp: Path, endpoint: str, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp / "hf_home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_client(args: list[str], tmp: Path, endpoint: str, token: str | None = None) -> Ran:
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, *args], env=client_env(tmp, endpoint, token), capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT_S, cwd=tmp)
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def bakeedit(*args: str, tmp: Path, endpoint: str, token: str | None = None) -> Ran:
    """The ``bakeedit`` command in a fresh process."""
    return run_client(["-c", "from bakeedit.cli import main; main()", *args], tmp, endpoint, token)


def check_remote(repo_id: str, local: Path, tmp: Path, endpoint: str, token: str | None = None,
                 pin: bool = False) -> dict:
    """snapshot_download + ModelCard.load + from_pretrained of ``repo_id`` vs ``local`` (``client_check.py``)."""
    args = [str(HERE / "client_check.py"), repo_id, str(local), *(["--pin"] if pin else [])]
    ran = run_client(args, tmp, endpoint, token)
    assert ran.returncode == 0, ran.output[-4000:]
    return json.loads(ran.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_mirror(folder: Path, mirrors: Path, repo_id: str) -> Path:
    """Commit ``folder``'s files into a git repository where olah looks for mirrors (``models/<org>/<name>``).

    Plus one hidden placeholder, ``additional_chat_templates/.gitkeep``: transformers' tokenizer loader lists that
    folder, and olah (0.5.4) answers the listing of a missing folder with 401 RepoNotFound where the Hub answers
    404 EntryNotFound, which transformers treats as fatal. The placeholder is not a template and not compared.
    """
    repo = mirrors / "models" / repo_id
    shutil.copytree(folder, repo)
    (repo / "additional_chat_templates").mkdir()
    (repo / "additional_chat_templates" / ".gitkeep").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=bakeedit-tests", "-c", "user.email=tests@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "baked folder"]):
        subprocess.run([*git, *args], check=True, capture_output=True, timeout=60)
    return repo


def _wait_until_ready(ready_r: int, proc: subprocess.Popen, log: Path) -> None:
    """Block until the server writes its readiness byte (or exits, or the start timeout passes)."""
    readable, _, _ = select.select([ready_r], [], [], OLAH_START_TIMEOUT_S)
    if not readable or os.read(ready_r, 1) != b"1":
        state = f"exited with {proc.poll()}" if proc.poll() is not None else f"silent for {OLAH_START_TIMEOUT_S} s"
        raise RuntimeError(f"olah did not start ({state}):\n{log.read_text()[-3000:]}")


@contextmanager
def olah_server(mirrors: Path, work: Path) -> Iterator[str]:
    """Run olah (offline mode) on a free loopback port, serving the git repositories under ``mirrors``."""
    port = free_port()
    config = work / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{work / "cache"}"\n'
        f'mirrors-path = ["{mirrors}"]\n[accessibility]\noffline = true\n'
    )
    log = work / "olah.log"
    ready_r, ready_w = os.pipe()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", OLAH_MAIN, str(config), str(work / "logs"), str(SERVER_LIFETIME_S), str(ready_w)],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, env=client_env(work, "http://127.0.0.1:9", None),
            pass_fds=(ready_w,),
        )
        os.close(ready_w)  # the child's copy is the only writer: its exit means EOF here
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_ready(ready_r, proc, log)
            yield url
        finally:
            os.close(ready_r)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
