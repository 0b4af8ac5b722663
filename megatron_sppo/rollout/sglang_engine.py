"""The production rollout engine: SGLang servers behind the RolloutEngine interface.

Servers are launched here (one per replica, :mod:`.sglang_launcher`) or attached by
address; generation goes through :class:`.sglang_client.SGLangClient`; weights through one
of the transports of :mod:`.sglang_weights`: ``sync="tensor"`` (CUDA IPC, servers on this
node's GPUs; from one process every server TP rank gets its own entry of this process's
handles) or ``sync="distributed"`` (NCCL broadcast to servers on other GPUs). A multi-rank
colocated trainer replaces :attr:`SGLangEngine.sync` by a :class:`.sglang_weights.TensorSync`
whose entries come from the trainer ranks on the servers' GPUs
(:mod:`megatron_sppo.trainer.weight_sync`).

What each server runs with is read from its ``/server_info`` at start (TP size, GPUs,
``enable_deterministic_inference``): SGLang 0.5.23 honours ``sampling_seed`` only with that
flag (sampling/sampling_batch_info.py), so seeded, reproducible rollouts need it on every
server, and without it the client does not pretend otherwise (:class:`.sglang_client.SGLangClient`
``seeded``).

``payload="fp8_block"`` serves servers launched from a 128x128 block-FP8 checkpoint: every
projection weight is quantised (e4m3 + ``weight_scale_inv``) before it is bucketed, because
SGLang loads pushed tensors as they come and never re-quantises bf16
(:func:`megatron_sppo.quant.fp8_block.sync_payload_format` decides which payload a server needs).
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.engine import Sample, SamplingParams
from megatron_sppo.rollout.export import DEFAULT_BUCKET_BYTES, bucketed
from megatron_sppo.rollout.sglang_client import SGLangClient, SGLangHTTP, on_each
from megatron_sppo.rollout.sglang_launcher import (DEFAULT_SGLANG_PYTHON, LaunchOptions,
                                                   SGLangServer, launch_servers)
from megatron_sppo.rollout.sglang_weights import BroadcastSync, TensorSync

SYNCS = ("distributed", "tensor")
PAYLOADS = ("bf16", "fp8_block")


def weight_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], payload: str,
                   bucket_bytes: int):
    """The buckets a sync sends (quantised first for ``payload="fp8_block"``), the same on
    every trainer rank that supplies entries."""
    if payload == "fp8_block":
        from megatron_sppo.quant.fp8_block import quantize_named_tensors

        named_tensors = quantize_named_tensors(named_tensors)
    return bucketed(named_tensors, bucket_bytes)


class SGLangEngine:
    """:class:`~megatron_sppo.rollout.engine.RolloutEngine` over SGLang servers."""

    def __init__(self, servers: list[SGLangServer], *, sync: str = "distributed",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, master_address: str = "127.0.0.1",
                 master_port: int = 29700, sync_backend: str = "nccl",
                 sync_device: str = "cuda", payload: str = "bf16", **client_options):
        if sync not in SYNCS:
            raise UserError(f"sync={sync!r}: use one of {', '.join(SYNCS)}")
        if payload not in PAYLOADS:
            raise UserError(f"payload={payload!r}: use one of {', '.join(PAYLOADS)}")
        self.payload = payload
        self.servers = servers
        self.info = [SGLangHTTP(s).request("GET", "/server_info", timeout_s=30).json()
                     for s in servers]
        seeded = all(i.get("enable_deterministic_inference", False) for i in self.info)
        self.client = SGLangClient(servers, seeded=seeded, **client_options)
        self.bucket_bytes = bucket_bytes
        self._version = 0
        endpoints = self.client.endpoints
        tp_sizes = [int(i["tp_size"]) for i in self.info]
        if sync == "tensor":
            self.sync = TensorSync(endpoints, [[0] * tp for tp in tp_sizes])
        else:
            self.sync = BroadcastSync(endpoints, tp_sizes, master_address=master_address,
                                      master_port=master_port, backend=sync_backend,
                                      device=sync_device)

    def server_gpus(self) -> list[list[int]]:
        """Each server's GPU index per TP rank (``--base-gpu-id`` + r ``--gpu-id-step``), as
        this node numbers them (launched servers share this process's visible devices)."""
        return [[int(i.get("base_gpu_id", 0)) + r * int(i.get("gpu_id_step", 1))
                 for r in range(int(i["tp_size"]))] for i in self.info]

    @classmethod
    def create(cls, model_path: str | None = None, *, addresses: Iterable[str] = (),
               python: str = DEFAULT_SGLANG_PYTHON, replicas: int = 1, tp_size: int = 1,
               host: str = "127.0.0.1", port: int = 30000, base_gpu_id: int = 0,
               mem_fraction_static: float | None = None, enable_memory_saver: bool = False,
               enable_deterministic_inference: bool = False,
               dtype: str = "auto", quantization: str | None = None,
               startup_timeout_s: float = 600.0, request_timeout_s: float = 3600.0,
               bucket_mb: int = DEFAULT_BUCKET_BYTES >> 20, log_dir: str | None = None,
               **engine_options) -> "SGLangEngine":
        """Attach ``addresses`` if given, else launch ``replicas`` servers of ``model_path``."""
        addresses = list(addresses)
        if addresses:
            servers = [SGLangServer.attach(a) for a in addresses]
            for server in servers:
                server.wait_healthy(startup_timeout_s)
        else:
            if not model_path:
                raise UserError("the SGLang engine needs model_path (an HF directory) to launch "
                                "servers, or rollout.sglang.addresses of running ones")
            base = LaunchOptions(model_path=str(model_path), python=python, host=host, port=port,
                                 tp_size=tp_size, base_gpu_id=base_gpu_id,
                                 mem_fraction_static=mem_fraction_static,
                                 enable_memory_saver=enable_memory_saver,
                                 enable_deterministic_inference=enable_deterministic_inference,
                                 dtype=dtype, quantization=quantization)
            servers = launch_servers(base, replicas, startup_timeout_s, log_dir)
        try:
            return cls(servers, bucket_bytes=bucket_mb << 20,
                       request_timeout_s=request_timeout_s, restart_timeout_s=startup_timeout_s,
                       **engine_options)
        except BaseException:
            for server in servers:
                server.stop()
            raise

    # ---- RolloutEngine -----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        return self.client.generate(prompts, params)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: int) -> None:
        self.sync.push(weight_buckets(named_tensors, self.payload, self.bucket_bytes), version)
        self._version = version

    @property
    def weight_version(self) -> int:
        return self._version

    def server_weight_versions(self) -> list[str]:
        """What each server reports (``/model_info``'s weight_version)."""
        return on_each(self.client.live, lambda e: e.model_info().get("weight_version"))

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Free the servers' GPU memory (all of weights, KV cache, CUDA graphs by default);
        needs ``enable_memory_saver`` and idle servers."""
        on_each(self.client.live, lambda e: e.release_memory(tags))

    def resume_memory(self, tags: list[str] | None = None) -> None:
        on_each(self.client.live, lambda e: e.resume_memory(tags))

    def health(self) -> bool:
        return bool(self.client.live) and all(on_each(self.client.live, lambda e: e.healthy()))

    def shutdown(self) -> None:
        if isinstance(self.sync, BroadcastSync) and self.sync.group is not None:
            self.sync.close()
        self.client.close()
        for server in self.servers:
            server.stop()
