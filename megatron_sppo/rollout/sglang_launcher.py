"""SGLang servers as subprocesses in their own Python environment, or already running ones.

SGLang pins its own torch and CUDA kernels, so the trainer never imports it: each rollout
replica is ``<sglang python> -m sglang.launch_server ...`` in a new process group, reached
over HTTP. Weight updates need ``--dp-size 1``, so data parallelism is one server per
replica (placed with ``--base-gpu-id``), balanced by the client. Flags are those of SGLang
0.5.23 (``sglang/srt/arg_groups/fields/*.py``: a field ``tp_size`` is ``--tp-size``).

A launched server starts with SIGUSR1 blocked (``runtime.signals``): Slurm's time-limit
warning reaches every process of the job step, and the server must keep serving the step the
trainer finishes before it checkpoints. SIGTERM stays deliverable: ``SGLangServer.stop`` and
SGLang's own shutdown of its scheduler processes rely on it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.engine import EngineError
from megatron_sppo.runtime.signals import stop_signals_blocked

DEFAULT_SGLANG_PYTHON = "/opt/sglang-venv/bin/python"


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How one server is started. ``mem_fraction_static`` None leaves SGLang's default."""

    model_path: str
    python: str = DEFAULT_SGLANG_PYTHON
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    base_gpu_id: int = 0
    mem_fraction_static: float | None = None
    enable_memory_saver: bool = False
    enable_deterministic_inference: bool = False
    dtype: str = "auto"
    quantization: str | None = None
    random_seed: int | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def server_command(opts: LaunchOptions) -> list[str]:
    """The command line that starts one SGLang server for ``opts``."""
    cmd = [opts.python, "-m", "sglang.launch_server", "--model-path", str(opts.model_path),
           "--host", opts.host, "--port", str(opts.port), "--tp-size", str(opts.tp_size),
           "--dp-size", "1", "--base-gpu-id", str(opts.base_gpu_id), "--dtype", opts.dtype]
    if opts.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(opts.mem_fraction_static)]
    if opts.enable_memory_saver:
        cmd.append("--enable-memory-saver")
    if opts.enable_deterministic_inference:
        cmd.append("--enable-deterministic-inference")
    if opts.quantization:
        cmd += ["--quantization", opts.quantization]
    if opts.random_seed is not None:
        cmd += ["--random-seed", str(opts.random_seed)]
    return cmd + list(opts.extra_args)


def replica_options(base: LaunchOptions, replicas: int) -> list[LaunchOptions]:
    """One server per replica: consecutive GPU blocks of ``tp_size`` and consecutive ports."""
    return [dataclasses.replace(base, base_gpu_id=base.base_gpu_id + i * base.tp_size,
                                port=base.port + i) for i in range(replicas)]


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens there (SO_REUSEADDR as servers bind: TIME_WAIT is no use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class SGLangServer:
    """One server: launched here (``options`` given; restartable) or attached by address."""

    def __init__(self, url: str, options: LaunchOptions | None = None,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None):
        self.url = url.rstrip("/")
        self.options = options
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.process: subprocess.Popen | None = None

    @classmethod
    def attach(cls, address: str) -> "SGLangServer":
        """An already running server, ``host:port`` or a URL."""
        url = address if "://" in address else f"http://{address}"
        if not urlsplit(url).port:
            raise UserError(f"SGLang address {address!r} has no port: give it as host:port")
        return cls(url)

    @property
    def launched(self) -> bool:
        return self.options is not None

    def start(self, timeout_s: float = 600.0) -> None:
        """Start the process and wait until /health answers 200 (or fail with its log)."""
        self.spawn()
        self.wait_healthy(timeout_s)

    def spawn(self) -> None:
        """Start the process without waiting for it."""
        opts = self.options
        if opts is None:
            raise EngineError(f"{self.url} was attached, not launched here: it cannot be started")
        if port_in_use(opts.host, opts.port):
            raise UserError(f"port {opts.port} on {opts.host} is already in use: choose another "
                            "rollout.sglang.port, stop what runs there, or attach a running "
                            "server with rollout.sglang.addresses")
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            with stop_signals_blocked((signal.SIGUSR1,)):
                self.process = subprocess.Popen(
                    server_command(opts), stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, **(self.env or {})}, start_new_session=True)
        finally:
            if self.log_path:
                log.close()

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EngineError(f"SGLang server {self.url} exited with code "
                                  f"{self.process.returncode} while starting{self._log_hint()}")
            if self.healthy(timeout_s=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
            time.sleep(poll_s)
        self.stop()
        raise EngineError(f"SGLang server {self.url} was not healthy after {timeout_s:.0f} s"
                          f"{self._log_hint()}: raise rollout.sglang.startup_timeout_s or "
                          "check the server log")

    def _log_hint(self) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
        return f" (log {self.log_path}: {tail[0][:200]})" if tail else f" (log {self.log_path})"

    def restart(self, timeout_s: float = 600.0) -> bool:
        """Restart a launched server; False for an attached one (nothing to restart)."""
        if not self.launched:
            return False
        self.stop()
        self.start(timeout_s)
        return True

    def stop(self, grace_s: float = 30.0) -> None:
        """Terminate the server's process group (SGLang forks scheduler processes)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def launch_servers(base: LaunchOptions, replicas: int = 1, timeout_s: float = 600.0,
                   log_dir: str | Path | None = None) -> list[SGLangServer]:
    """Start ``replicas`` servers (see :func:`replica_options`) together, then wait for all
    of them; on any failure the ones already started are stopped."""
    servers = []
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    try:
        for i, opts in enumerate(replica_options(base, replicas)):
            log = Path(log_dir) / f"sglang_{i}.log" if log_dir else None
            servers.append(SGLangServer(opts.url, opts, log_path=log))
            servers[-1].spawn()
        deadline = time.monotonic() + timeout_s
        for server in servers:
            server.wait_healthy(max(0.0, deadline - time.monotonic()))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
