"""The stand-in's HTTP process: SGLang 0.5.23's launch_server + tokenizer manager
(entrypoints/http_server.py, managers/tokenizer_manager.py, tokenizer_control_mixin.py).

It starts one scheduler process per TP rank (:mod:`.scheduler`), waits until every rank has
loaded the model and sized its KV pool (a rank failing at start-up ends the server with its
error as the last log line), then serves the native endpoints:

* ``/generate``: a batch of prompts (or one), ``n > 1`` expanded prompt by prompt
  ([p0 x n, p1 x n, ...], each sample a fresh rid); invalid sampling params answer 400
  ``{"error": {"message"}}``; a new request waits while generation is paused.
* weight updates and the begin/end session calls wait for running requests to finish (the
  model-update writer lock) unless generation is paused; ``weight_version`` moves with a
  successful update that names one.
* ``/pause_generation``: ``abort`` aborts everything and waits until no request is left,
  ``retract`` and ``in_place`` go to the schedulers; ``/continue_generation`` resumes.
* ``/flush_cache``: 200, or 400 while requests run; memory release/resume, weight-update
  groups, ``/get_weights_by_name``, ``/update_weight_version``, ``/abort_request``,
  ``/server_info`` (the launch arguments plus ``max_total_num_tokens``), ``/model_info``.

If a scheduler dies, the server exits (SGLang's launcher kills the whole process tree).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import socket
import tempfile
import threading
import uuid
from http.server import ThreadingHTTPServer

from sglang.launch_server import make_handler

VERSION = "0.5.23"


def parse_args(argv: list[str]) -> dict:
    """The SGLang flags the stand-in implements; any other flag is refused, as argparse does."""
    p = argparse.ArgumentParser(prog="python -m sglang.launch_server")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--base-gpu-id", type=int, default=0)
    p.add_argument("--gpu-id-step", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--mem-fraction-static", type=float, default=0.88)
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--enable-weights-cpu-backup", action="store_true")
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--random-seed", type=int, default=None)
    p.add_argument("--log-level", default="info")
    args = vars(p.parse_args(argv))
    if args["dp_size"] != 1:
        p.error("the stand-in serves --dp-size 1 (weight updates need it)")
    if args["random_seed"] is None:
        args["random_seed"] = int.from_bytes(os.urandom(4), "little")
    return args


class Frontend:
    """Routes HTTP calls to the schedulers through rank 0's pipe."""

    def __init__(self, args: dict, conn, info: dict):
        self.args, self.conn, self.info = args, conn, info
        self.weight_version = "default"
        self.cond = threading.Condition()
        self.paused = False
        self.readers = 0  # /generate calls in flight
        self.writer = False
        self.update_lock = threading.Lock()  # SGLang's is_pause_cond around paused updates
        self.send_lock = threading.Lock()
        self.waiters: dict[object, list] = {}  # rid or call id -> [event, result]
        self.calls = itertools.count()
        threading.Thread(target=self._read, daemon=True).start()

    # ---- plumbing ------------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            kind, key, *result = self.conn.recv()
            if kind == "fatal":
                _fatal(result[0])
            waiter = self.waiters.pop(key)
            waiter[1] = result[0] if kind == "output" else result
            waiter[0].set()

    def _send(self, message: dict, keys: list) -> list[list]:
        waiters = [[threading.Event(), None] for _ in keys]
        self.waiters.update(zip(keys, waiters))
        with self.send_lock:
            self.conn.send(message)
        for waiter in waiters:
            waiter[0].wait()
        return [w[1] for w in waiters]

    def call(self, kind: str, body: dict | None = None) -> tuple[bool, str, object]:
        key = ("call", next(self.calls))
        (result,) = self._send({"kind": kind, "body": body or {}, "id": key}, [key])
        return result

    def _exclusive(self, kind: str, body: dict) -> tuple[bool, str, object]:
        """A model update: straight through while paused, else after running requests."""
        with self.update_lock:
            if self.paused:
                return self.call(kind, body)
        with self.cond:
            self.cond.wait_for(lambda: not self.readers and not self.writer)
            self.writer = True
        try:
            return self.call(kind, body)
        finally:
            with self.cond:
                self.writer = False
                self.cond.notify_all()

    # ---- endpoints -------------------------------------------------------------------------

    def generate(self, body: dict):
        from sglang.standin.sampler import check_params

        ids = body.get("input_ids")
        if not ids:
            return 400, {"error": {"message": "Either text or input_ids should be provided."}}
        batch = isinstance(ids[0], list)
        prompts = ids if batch else [ids]
        sp = body.get("sampling_params") or {}
        sps = sp if isinstance(sp, list) else [sp] * len(prompts)
        rids = body.get("rid")
        rids = (rids if isinstance(rids, list) else [rids]) if rids is not None else [
            uuid.uuid4().hex for _ in prompts]
        if len(sps) != len(prompts) or len(rids) != len(prompts):
            return 400, {"error": {"message": "The lengths of input_ids, sampling_params and "
                                              "rid must match."}}
        for one in sps:
            error = check_params(one, self.info["vocab_size"])
            if error:
                return 400, {"error": {"message": error}}
        n = sps[0].get("n") or 1
        reqs = [{"rid": rid if n == 1 else uuid.uuid4().hex, "input_ids": prompt,
                 "sampling_params": one}
                for prompt, one, rid in zip(prompts, sps, rids) for _ in range(n)]
        with self.cond:
            self.cond.wait_for(lambda: not self.paused and not self.writer)
            self.readers += 1
        try:
            outputs = self._send({"kind": "generate", "reqs": reqs}, [r["rid"] for r in reqs])
        finally:
            with self.cond:
                self.readers -= 1
                self.cond.notify_all()
        return 200, (outputs if batch or n > 1 else outputs[0])

    def _answer(self, result, version: str | None = None):
        ok, message, _ = result
        if ok and version is not None:
            self.weight_version = version
        return (200 if ok else 400), {"success": ok, "message": message}

    def update_weights_from_tensor(self, body):
        return self._answer(self._exclusive("update_tensor", body), body.get("weight_version"))

    def update_weights_from_distributed(self, body):
        return self._answer(self._exclusive("update_distributed", body),
                            body.get("weight_version"))

    def begin_weight_update(self, body):
        return self._answer(self._exclusive("begin", body))

    def end_weight_update(self, body):
        return self._answer(self._exclusive("end", body))

    def init_weights_update_group(self, body):
        return self._answer(self.call("init_group", body))

    def destroy_weights_update_group(self, body):
        return self._answer(self.call("destroy_group", body))

    def pause_generation(self, body):
        mode = body.get("mode", "abort")
        with self.update_lock:
            with self.cond:
                self.paused = True
            if mode == "abort":
                with self.send_lock:
                    self.conn.send({"kind": "abort", "abort_all": True})
                with self.cond:
                    self.cond.wait_for(lambda: not self.readers)
            else:
                self.call("pause", {"mode": mode})
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body):
        with self.update_lock:
            self.call("continue")
            with self.cond:
                self.paused = False
                self.cond.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def flush_cache(self, body):
        ok, message, _ = self.call("flush_cache")
        return (200, "Cache flushed.\nPlease check backend logs for more details. (When there "
                "are running or waiting requests, the operation will not be performed.)\n") if ok \
            else (400, message)

    def release_memory_occupation(self, body):
        self.call("release", body)
        return 200, None

    def resume_memory_occupation(self, body):
        self.call("resume", body)
        return 200, None

    def get_weights_by_name(self, body):
        return 200, self.call("get_weights", body)[2]

    def update_weight_version(self, body):
        if body.get("abort_all_requests"):
            self.abort_request({"abort_all": True})
        self.call("weight_version", body)
        self.weight_version = body["new_version"]
        return 200, {"success": True, "message": f"Weight version updated to "
                     f"{body['new_version']}", "new_version": body["new_version"]}

    def abort_request(self, body):
        with self.send_lock:
            self.conn.send({"kind": "abort", "rid": body.get("rid"),
                            "abort_all": bool(body.get("abort_all"))})
        return 200, ""

    def route(self, method: str, path: str, body: dict):
        name = path.strip("/")
        if name in ("health", "health_generate"):
            return 200, ""
        if name == "model_info":
            return 200, {"model_path": self.args["model_path"],
                         "tokenizer_path": self.args["model_path"], "is_generation": True,
                         "weight_version": self.weight_version}
        if name == "server_info":
            return 200, {**self.args, **self.info, "version": VERSION,
                         "internal_states": [self.info]}
        handler = getattr(self, name, None)
        if handler is None or name.startswith("_") or name in ("call", "route"):
            return 404, {"detail": "Not Found"}
        return handler(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fatal(message: str) -> None:
    """A TP rank failed: the server stops with its error as the last line of the log."""
    print(message, flush=True)
    os._exit(1)


def _watch(proc, rank: int) -> None:
    proc.join()
    _fatal(f"Child process unexpectedly failed: TP rank {rank} exited with code "
           f"{proc.exitcode}; the server stops")


def main(argv: list[str]) -> None:
    from sglang.standin.scheduler import run

    args = parse_args(argv)
    # TP ranks are GPU processes: they always run on the emulated accelerator, sharing the
    # memory accounting of whatever else runs on those GPUs (the trainer, when it is emulated)
    os.environ["MEGATRON_SPPO_EMULATE_GPU"] = "1"
    os.environ.setdefault("MEGATRON_SPPO_EMULATE_GPU_DIR",
                          tempfile.mkdtemp(prefix="megatron-sppo-emulated-gpus-"))
    ctx = multiprocessing.get_context("spawn")
    port, ranks = _free_port(), []
    for rank in range(args["tp_size"]):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=run, args=(rank, args, child, port), daemon=True)
        proc.start()
        ranks.append((proc, parent))
    infos = []
    for rank, (proc, conn) in enumerate(ranks):
        try:
            kind, _, info = conn.recv()
        except EOFError:
            kind, info = "fatal", f"TP rank {rank} exited with code {proc.exitcode}"
        if kind == "fatal":
            _fatal(info)
        infos.append(info)
        threading.Thread(target=_watch, args=(proc, rank), daemon=True).start()
    httpd = ThreadingHTTPServer((args["host"], args["port"]),
                                make_handler(Frontend(args, ranks[0][1], infos[0]).route))
    httpd.daemon_threads = True
    print(json.dumps({"argv": argv}), flush=True)
    print("The server is fired up and ready to roll!", flush=True)
    httpd.serve_forever()
