"""timm's ``set_grad_checkpointing`` on a model with a reducer: the backbone's parts of each block
are checkpointed, and the gradients are those of the same step without checkpointing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

from helpers import tiny_vit
from tnt_lightning.engine import TokenReducer, apply_reducer, backbone_info, patch
from tnt_lightning.engine.reducer import BackboneInfo
from tnt_lightning.methods import DTPS, TNT, DynamicViT, LearnedReducer, ToMe, TopK

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
Y = torch.tensor([1, 2, 3, 4])

REDUCERS: dict[str, Callable[[BackboneInfo], TokenReducer]] = {
    "topk": lambda info: TopK([1, 2], [0.7, 0.7]),  # the CLS row of the attention
    "tome": lambda info: ToMe([0, 1, 2], [2, 2, 2]),  # keys, proportional attention's bias
    "dynamicvit": lambda info: DynamicViT(info, [0, 1], [0.7, 0.49]),  # masked training
    "dtps_official_rounding": lambda info: DTPS(info, [0, 1], [0.7, 0.49], official_rounding=True),
    "tnt": lambda info: TNT(info, "single", [1], [0.5], noise_blocks=2),
}


def _step(method: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One training step (drop path on, every parameter training); its gradients and loss."""
    model = tiny_vit(prefix=1, depth=4)
    for block in model.blocks:
        block.drop_path1, block.drop_path2 = DropPath(0.2), DropPath(0.2)
    reducer = REDUCERS[method](backbone_info(model))
    apply_reducer(model, reducer).train()
    model.set_grad_checkpointing(checkpointing)
    torch.manual_seed(7)
    if isinstance(reducer, LearnedReducer):
        loss = reducer.training_loss(model, X, Y, 0.1).loss
    else:
        loss = F.cross_entropy(model(X), Y)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, loss.detach()


@pytest.mark.parametrize("method", sorted(REDUCERS))
def test_checkpointed_blocks_give_the_gradients_of_the_plain_step(method, monkeypatch):
    plain, plain_loss = _step(method, checkpointing=False)
    calls = []
    checkpoint = patch.checkpoint
    monkeypatch.setattr(patch, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    checkpointed, loss = _step(method, checkpointing=True)
    assert calls, "set_grad_checkpointing(True) was ignored"
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert checkpointed.keys() == plain.keys() and any(n.startswith("reducer.") for n in plain) == (
        method in ("dynamicvit", "dtps_official_rounding", "tnt")
    )
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


def test_no_checkpoint_without_gradients(monkeypatch):
    model = apply_reducer(tiny_vit(prefix=1, depth=4), TopK([1], [0.5]))
    model.set_grad_checkpointing(True)
    monkeypatch.setattr(patch, "checkpoint", lambda *a, **kw: pytest.fail("checkpointed under no_grad"))
    with torch.no_grad():
        model(X)
