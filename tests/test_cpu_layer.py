"""The CPU device layer: what megatron-core asks of CUDA is answered by the CPU, in-process."""

from __future__ import annotations

import pytest
import torch

from megatron_sppo.runtime import cpu_megatron_enabled, enable_cpu_megatron


def test_enabled_without_cuda_and_idempotent():
    assert enable_cpu_megatron() is True
    assert enable_cpu_megatron() is True and cpu_megatron_enabled()


def test_cuda_device_arguments_land_on_cpu():
    enable_cpu_megatron()
    for device in ("cuda", "cuda:1", torch.device("cuda"), 0, torch.cuda.current_device()):
        assert torch.zeros(2, device=device).device.type == "cpu", device
    assert torch.ones(3).to("cuda").device.type == "cpu"
    assert torch.ones(3).cuda().device.type == "cpu"
    module = torch.nn.Linear(2, 2).cuda()
    assert module.weight.device.type == "cpu"


def test_tensor_type_reports_the_accelerator_twin():
    enable_cpu_megatron()
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.nn.Parameter(torch.zeros(1)).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # conversion unchanged


def test_streams_and_events_are_synchronous_no_ops():
    enable_cpu_megatron()
    stream = torch.cuda.current_stream()
    with torch.cuda.stream(torch.cuda.Stream()):
        x = torch.ones(2) * 2
    stream.wait_stream(torch.cuda.Stream())
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    torch.cuda.synchronize()
    assert event.query() and x.sum().item() == 4
    assert isinstance(torch.cuda.Stream, type)  # annotations like `torch.cuda.Stream | None`
    assert (torch.cuda.Stream | None) is not None


def test_cuda_rng_is_the_cpu_rng_and_megatron_tracker_forks_it():
    enable_cpu_megatron()
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.manual_seed(7)
    a = torch.rand(3)
    torch.cuda.manual_seed(7)
    assert torch.equal(torch.rand(3), a)
    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        forked = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the outer state"
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), forked), "the tracked state is seeded independently"


def test_megatron_gradient_clipping_on_cpu():
    """clip_grad_by_total_norm_fp32 asserts CUDA float grads; on CPU it must clip for real."""
    enable_cpu_megatron()
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    params[0].grad = torch.full((4,), 3.0)
    params[1].grad = torch.full((4,), 4.0)
    total = torch.cat([p.grad for p in params]).norm().item()
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total)
    assert total == 10.0
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(params[0].grad, torch.full((4,), 0.3), atol=1e-6)
