"""The evaluation task refuses what it could only do other than asked."""

from __future__ import annotations


def test_an_evaluation_does_not_train_a_learned_method_on_random_weights(compose_cfg):
    import pytest
    from hydra.utils import instantiate

    from tnt_lightning.errors import UserError
    from tnt_lightning.tasks.evaluate import build_pruned_model
    from tnt_lightning.tasks.records import RunRecorder

    cfg = compose_cfg("method=tnt", "keep_rate=0.5", "model.weights=random")
    spec = instantiate(cfg.model)
    expected = r"method=tnt would first be trained, \d+ epochs.*random weights.*task=train"
    with pytest.raises(UserError, match=expected):
        build_pruned_model(cfg, spec, True, [], RunRecorder(cfg, keep_rate=0.5))


def test_random_weights_are_drawn_from_the_runs_seed(compose_cfg):
    """The same config draws the same random backbone (a rerun repeats); another seed another one."""
    import torch
    from hydra.utils import instantiate

    from tnt_lightning.tasks.evaluate import build_pruned_model
    from tnt_lightning.tasks.records import RunRecorder

    def weights(seed: int, before: int) -> torch.Tensor:
        cfg = compose_cfg("method=topk", "model.weights=random", f"seed={seed}")
        torch.manual_seed(before)  # whatever the global generator held before the run
        model = build_pruned_model(cfg, instantiate(cfg.model), True, [], RunRecorder(cfg, keep_rate=0.5))
        return model.blocks[0].attn.qkv.weight.detach().clone()

    assert torch.equal(weights(0, before=1), weights(0, before=2))
    assert not torch.equal(weights(0, before=1), weights(1, before=1))
