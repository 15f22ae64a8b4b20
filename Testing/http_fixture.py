"""Test helpers: a real HTTP server on 127.0.0.1 with failure modes, and tiny model packages.

``LoopbackServer`` serves byte strings by path, honours ``Range: bytes=N-`` (206), and per path can:
``ok``; ``wrong`` (other bytes of the same length); ``cut`` (the first request without a Range
gets half the body, then the connection is closed); ``cut-norange`` (the same, and Range is then
ignored: 200 and the whole body); ``stall`` (headers, then nothing); ``slow`` (small chunks with pauses);
``redirect:<url>`` (302 to that URL).
A path not served answers 404. Every request is logged with its Range header and status.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple


class LoopbackServer:
    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.modes: Dict[str, str] = {}
        self.requests: List[Tuple[str, Optional[str], int]] = []
        self.release = threading.Event()
        self.slow_chunk = 4096
        self.slow_pause = 0.01
        self._cut_done: set = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    # -- control --------------------------------------------------------------------------------
    def start(self) -> LoopbackServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def serve(self, path: str, data: bytes, mode: str = "ok") -> str:
        path = "/" + path.lstrip("/")
        self.files[path] = data
        self.modes[path] = mode
        return self.url(path)

    def hits(self, path: str) -> int:
        path = "/" + path.lstrip("/")
        return sum(1 for p, _, _ in self.requests if p == path)

    # -- serving --------------------------------------------------------------------------------
    def _log(self, path: str, range_header: Optional[str], status: int) -> None:
        with self._lock:
            self.requests.append((path, range_header, status))

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        range_header = h.headers.get("Range")
        data = self.files.get(path)
        if data is None:
            self._log(path, range_header, 404)
            body = b"not found"
            h.send_response(404)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        mode = self.modes.get(path, "ok")
        if mode.startswith("redirect:"):
            self._log(path, range_header, 302)
            h.send_response(302)
            h.send_header("Location", mode[len("redirect:") :])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if mode == "wrong":
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        start = 0
        if range_header and mode != "cut-norange":
            spec = range_header.replace("bytes=", "").split("-")[0]
            start = int(spec) if spec.isdigit() else 0
        cut_now = mode in ("cut", "cut-norange") and path not in self._cut_done and not range_header
        status = 206 if start else 200
        self._log(path, range_header, status)
        body = data[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "none" if mode == "cut-norange" else "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        try:
            if cut_now:
                self._cut_done.add(path)
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            if mode == "stall":
                self.release.wait(10)
                h.close_connection = True
                return
            if mode == "slow":
                for i in range(0, len(body), self.slow_chunk):
                    h.wfile.write(body[i : i + self.slow_chunk])
                    h.wfile.flush()
                    if self.release.wait(self.slow_pause):
                        break
                return
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- tiny model packages ------------------------------------------------------------------------
def tiny_card(name: str = "tiny-spine", version: str = "0.1.0", echo_times=(2.2, 4.4), **arch_kwargs) -> dict:
    """A model.json (without weights) for a width-4, depth-2 UNet3D over one channel per echo."""
    kwargs = {"depth": 2, "width": 4, "norm": "instance", "residual": True}
    kwargs.update(arch_kwargs)
    n = len(echo_times)
    return {
        "name": name,
        "version": version,
        "description": "Tiny test model",
        "license": "Apache-2.0",
        "intended_use": "Tests only",
        "anatomy": "lumbar spine",
        "architecture": {"name": "unet3d", "kwargs": kwargs},
        "inputs": [
            {"name": f"echo{i + 1}", "sequence": "MEGRE", "echo_time_ms": te} for i, te in enumerate(echo_times)
        ],
        "spacing_mm": [2.0, 2.0, 2.0],
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"} for _ in range(n)],
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": [16, 16, 16],
        "overlap": 0.25,
        "training_data": {"summary": "none", "cases": 0},
        "validation_metrics": {},
    }


def tiny_network(card: dict, seed: int = 0):
    import torch

    from SyntheticCTLib.models.architectures import build_network

    torch.manual_seed(seed)
    kwargs = dict(card["architecture"]["kwargs"])
    kwargs.setdefault("in_channels", len(card["inputs"]))
    return build_network(card["architecture"]["name"], **kwargs).eval()


def write_tiny_package(folder: Path, seed: int = 0, weights_format: str = "safetensors", **card_kwargs):
    """Write a tiny package into ``folder``; return ``(folder, network)``."""
    from SyntheticCTLib.models.package import write_model_package

    card = tiny_card(**card_kwargs)
    network = tiny_network(card, seed)
    write_model_package(folder, card, network.state_dict(), weights_format=weights_format)
    return Path(folder), network


def tiny_package_zip(folder: Path, zip_path: Path, **card_kwargs) -> bytes:
    """Write a tiny package and zip it; return the zip's bytes."""
    from SyntheticCTLib.models.archive import zip_folder

    write_tiny_package(folder, **card_kwargs)
    zip_folder(folder, zip_path)
    return Path(zip_path).read_bytes()


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
