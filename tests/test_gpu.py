"""CUDA paths: every test here is marked ``gpu`` and skipped without a CUDA device (conftest.py);
`make gpu-check` runs them first on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_vit
from tnt_lightning.engine import apply_reducer, backbone_info
from tnt_lightning.measure import TimedModel, bench, measure_throughput
from tnt_lightning.methods import DynamicViT
from tnt_lightning.tasks.gpu_check import TOLERANCES, exact_fp32, relative_error, traced_forward

pytestmark = pytest.mark.gpu

# ToMe passes an attention mask (proportional attention) to SDPA; DynamicViT masks attention with
# its policy; Top-K is the plain case.
METHODS = ["topk", "tome", "evit", "dynamicvit", "zerotp"]


def built(method: str) -> torch.nn.Module:
    overrides = ["model=vit_mnist", "data=synthetic", f"method={method}"]
    return bench.build(overrides + (["keep_rate=0.7"] if method == "tome" else []))[0]


@pytest.mark.parametrize("method", METHODS)
def test_cuda_forward_equals_the_cpu_forward(method):
    model = built(method)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cpu_logits, cpu_kept = traced_forward(model, x)
    with exact_fp32():
        logits, kept = traced_forward(model.cuda(), x.cuda())
    assert relative_error(logits, cpu_logits) <= TOLERANCES["logits_rtol"]
    assert all(torch.equal(a, b) for a, b in zip(kept, cpu_kept, strict=True))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_autocast_runs_on_cuda_with_finite_logits(method, dtype):
    model = built(method).cuda()
    logits = TimedModel(model, "cuda", dtype)(torch.randn(8, 1, 28, 28, device="cuda"))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()


def test_throughput_synchronises_the_device_around_the_timed_passes(monkeypatch):
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device) or real(device))
    result = measure_throughput(built("topk"), (1, 28, 28), "cuda", batch_size=4, warmup=2, iters=3)
    # warm-up ends with one; the timed passes sit between two
    assert len(calls) == 3 and result["throughput_img_s"] > 0
    assert result["device"] == torch.cuda.get_device_name(0)


def test_dynamicvit_masked_attention_backward_on_cuda_matches_the_cpu():
    grads = {}
    for device in ("cpu", "cuda"):
        model = tiny_vit(prefix=1, depth=4)
        dvit = DynamicViT.from_schedule("multi", [0, 1], [0.5, 0.5], backbone_info(model), token_loss="mse")
        apply_reducer(model, dvit).train()
        model.blocks.eval()
        model.to(device)
        torch.manual_seed(0)
        x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
        with exact_fp32():
            out = dvit.training_loss(model, x.to(device), y.to(device), 0.0)
            out.loss.backward()
        grads[device] = torch.cat([p.grad.flatten().cpu() for p in dvit.parameters() if p.grad is not None])
        assert torch.isfinite(grads[device]).all()
    # the Gumbel draws differ between the devices' generators: the gradients agree in size only
    assert grads["cuda"].shape == grads["cpu"].shape and grads["cuda"].abs().sum() > 0


def test_pinned_memory_loader_feeds_cuda():
    from tnt_lightning.data import SyntheticDataModule

    data = SyntheticDataModule(input_size=(1, 28, 28), num_samples=8, num_classes=10, batch_size=4)
    assert data.pin_memory  # pin_memory=None: on where CUDA is
    x, _ = next(iter(data.train_dataloader()))
    assert x.is_pinned()
    assert x.to("cuda", non_blocking=True).device.type == "cuda"
