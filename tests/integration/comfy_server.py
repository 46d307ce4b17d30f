"""A real ComfyUI server with this pack for the integration suite (tests/integration/test_comfy_server.py).

`ComfyServer` runs ComfyUI's main.py from the cached install (tests/integration/comfy_install.py) on 127.0.0.1 and a
free port, with its own --base-directory (custom_nodes/ComfyUI-Bernini is a symlink to this repo; models/, input/,
output/, temp/ and user/ live in a temporary folder), --database-url in that folder, --cpu; it is always stopped by
its process id. Its log and outputs are kept under the artifacts folder (.ci/artifacts/comfy_server/, or
$BERNINI_ARTIFACTS/comfy_server/) so CI leaves them behind.

`WsListener` is a minimal RFC 6455 client for ComfyUI's /ws (text frames only; preview images are binary frames and
are skipped): it records every JSON message the server sends to its client id.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

from comfy_install import REPO, Install

PACK_FOLDER = "ComfyUI-Bernini"  # the folder name ComfyUI Manager / the Registry install the pack under


def artifacts_dir() -> Path:
    root = os.environ.get("BERNINI_ARTIFACTS")
    return Path(root) if root else REPO / ".ci" / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """One ComfyUI process. `base` gets ComfyUI's folders; `start()` waits until /object_info answers."""

    def __init__(self, install: Install, base: Path, log_path: Path, extra_args=()):
        self.install, self.base, self.log_path = install, Path(base), Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.extra_args = tuple(extra_args)
        self.process: Optional[subprocess.Popen] = None
        self._log = None
        for folder in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    # ------------------------------------------------------------------------------------------ process
    def start(self, timeout: float = 180.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        cmd = [str(self.install.python), str(self.install.source / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base),
               "--user-directory", str(self.base / "user"), "--database-url", f"sqlite:///{self.base / 'comfyui.db'}",
               "--disable-auto-launch", "--preview-method", "latent2rgb", *self.extra_args]
        # A fixed mmap threshold: glibc's dynamic one rises to 32 MB after the first large free, so weights freed
        # later would stay in the heap and RSS could not show what /free released.
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   MALLOC_MMAP_THRESHOLD_="131072")
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):  # the test venv's paths must not leak into ComfyUI's
            env.pop(name, None)
        self.process = subprocess.Popen(cmd, cwd=str(self.base), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode} during start-up; log: {self.log_path}"
                                  f"\n{self.log_tail()}")
            try:
                self.get("/object_info/BerniniSources", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the server's own process group (it was started in a new session), then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            pgid = self.process.pid  # start_new_session: the group id is the server's pid
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None

    def rss_bytes(self) -> int:
        """The server process's resident memory (VmRSS of /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ServerError("no VmRSS in /proc status")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    # ------------------------------------------------------------------------------------------ HTTP
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, data: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:4000]}") from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        """POST /prompt under our client id (progress events come to our /ws); returns the prompt id."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise ServerError(f"prompt refused: {answer['node_errors']}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The /history entry once the prompt finished (success, error or interrupt)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status"):  # ComfyUI writes the history entry when the prompt has ended
                return entry
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue, wait, and fail with ComfyUI's own error message unless the prompt succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        status = entry["status"]
        if status.get("status_str") != "success":
            errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            raise ServerError(f"prompt failed: {json.dumps(errors or status)[:6000]}")
        return entry


def output_files(entry: dict, base: Path) -> list[Path]:
    """The files a finished prompt's output nodes report (SaveImage "images", SaveVideo "images"/"videos")."""
    files = []
    for node_output in entry.get("outputs", {}).values():
        for key in ("images", "videos", "gifs", "animated"):
            for item in node_output.get(key, []) or []:
                if isinstance(item, dict) and "filename" in item:
                    folder = base / item.get("type", "output")
                    files.append(folder / item.get("subfolder", "") / item["filename"])
    return files


# ---------------------------------------------------------------------------------------------- /ws
class WsListener:
    """Reads ComfyUI's /ws?clientId=... in a thread and keeps every JSON message (dicts with "type", "data")."""

    def __init__(self, port: int, client_id: str):
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        header = b""
        while b"\r\n\r\n" not in header:
            chunk = self._sock.recv(1)
            if not chunk:
                raise ServerError("/ws closed during the handshake")
            header += chunk
        if b" 101 " not in header.split(b"\r\n", 1)[0]:
            raise ServerError(f"/ws handshake refused: {header[:200]!r}")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                b0, b1 = self._exact(2)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._exact(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._exact(8))[0]
                mask = self._exact(4) if b1 & 0x80 else None
                payload = self._exact(length)
                if mask:
                    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                if opcode == 0x8:
                    return
                if opcode == 0x1:  # text: ComfyUI's JSON messages (fragmentation is not used by aiohttp's send_str)
                    with self._lock:
                        self.messages.append(json.loads(payload.decode()))
        except (OSError, ConnectionError, ValueError):
            return

    def of_type(self, kind: str, prompt_id: Optional[str] = None) -> list[dict]:
        with self._lock:
            found = [m["data"] for m in self.messages if m.get("type") == kind]
        return [d for d in found if prompt_id is None or d.get("prompt_id") == prompt_id]

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def keep_artifacts(server: ComfyServer, name: str) -> Path:
    """Copy the server's outputs beside its log under the artifacts folder."""
    dest = artifacts_dir() / "comfy_server" / name
    dest.mkdir(parents=True, exist_ok=True)
    outputs = server.base / "output"
    if outputs.is_dir():
        shutil.copytree(outputs, dest / "output", dirs_exist_ok=True)
    return dest
