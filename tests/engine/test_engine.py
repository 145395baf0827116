"""The engine: hook points in an unmodified timm ViT, prefix handling, fused attention kept, tracing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_vit
from tnt_lightning.engine import (
    AttentionNeeds,
    Location,
    ReductionError,
    Site,
    TokenReducer,
    Tokens,
    apply_reducer,
    backbone_info,
    complement,
    gather_rows,
    remove_reducer,
)
from tnt_lightning.methods import RandomDrop, ToMe, TopK

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class Recorder(TokenReducer):
    """Keeps every token; records what the engine hands it at each location."""

    name = "recorder"

    def __init__(self, locations):
        super().__init__()
        self._locations, self._needs, self.calls = locations, AttentionNeeds(probs=True, keys=True), []

    def locations(self):
        return self._locations

    def needs(self, block):
        return self._needs if any(loc.block == block for loc in self._locations) else AttentionNeeds()

    def reduce(self, loc, tokens, attn):
        self.calls.append((loc, tokens.x.shape, attn))
        return tokens


class KeepLast(TokenReducer):
    """Keeps the last non-prefix tokens in reverse order: a visible reordering."""

    name = "keep_last"

    def __init__(self, loc, k):
        super().__init__()
        self.loc, self.k = loc, k

    def locations(self):
        return [self.loc]

    def reduce(self, loc, tokens, attn):
        self.prefix_before = tokens.prefix.clone()
        idx = torch.arange(tokens.n - 1, tokens.n - 1 - self.k, -1).expand(tokens.x.shape[0], -1)
        out = tokens.keep(idx)
        self.prefix_after = out.prefix.clone()
        return out


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_state_dict_keys_and_values_stay_timms(prefix):
    model = tiny_vit(prefix=prefix)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_reducer(model, TopK([1], [0.5]) if prefix else RandomDrop([1], [0.5]))
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    remove_reducer(model)
    assert type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled")


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_pass_through_reducer_reproduces_timm_logits(prefix):
    model = tiny_vit(prefix=prefix).double()
    expected = model(X.double())
    locations = [Location(Site.PRE), Location(Site.INSIDE, 1), Location(Site.AFTER, 2)]
    recorder = Recorder(locations)
    apply_reducer(model, recorder)
    assert torch.allclose(model(X.double()), expected, atol=1e-10)
    assert [c[0] for c in recorder.calls] == locations
    _, shape, attn = recorder.calls[1]
    assert attn.probs.shape == (3, 4, shape[1], shape[1])
    assert torch.allclose(attn.probs.sum(-1), torch.ones(()).double())
    assert attn.keys.shape == (3, 4, shape[1], 12)


def test_the_cls_row_alone_equals_that_row_of_the_full_probabilities():
    model = tiny_vit(prefix=2).double()
    recorder = Recorder([Location(Site.INSIDE, 1)])
    apply_reducer(model, recorder)
    model(X.double())
    full = recorder.calls[0][2].probs
    recorder._needs, recorder.calls = AttentionNeeds(cls_probs=True), []
    model(X.double())
    row = recorder.calls[0][2]
    assert row.probs is None and row.cls_probs.shape == (3, 4, 1, full.shape[-1])
    assert torch.allclose(row.cls_probs, full[:, :, :1], atol=1e-12)


def test_hook_sites_see_the_right_tensors():
    """INSIDE sees x + attn(norm1(x)) of its block; AFTER sees the block output."""
    model = tiny_vit(prefix=1).double()
    seen = {}
    hooks = [
        model.blocks[1].norm2.register_forward_pre_hook(lambda m, a: seen.setdefault("mid1", a[0].clone())),
        model.blocks[2].register_forward_hook(lambda m, a, out: seen.setdefault("out2", out.clone())),
    ]
    model(X.double())
    for h in hooks:
        h.remove()
    recorder = Recorder([Location(Site.INSIDE, 1), Location(Site.AFTER, 2)])
    recorder.reduce = lambda loc, tokens, attn: (recorder.calls.append(tokens.x.clone()), tokens)[1]
    apply_reducer(model, recorder)
    model(X.double())
    assert torch.allclose(recorder.calls[0], seen["mid1"], atol=1e-10)
    assert torch.allclose(recorder.calls[1], seen["out2"], atol=1e-10)


@pytest.mark.parametrize("prefix", [1, 2])
def test_prefix_tokens_stay_first_and_unchanged(prefix):
    model = tiny_vit(prefix=prefix)
    reducer = KeepLast(Location(Site.AFTER, 1), k=5)
    apply_reducer(model, reducer)
    model(X)
    assert torch.equal(reducer.prefix_before, reducer.prefix_after)
    assert model.last_tokens.x.shape[1] == prefix + 5


def test_only_layers_that_need_attention_probabilities_leave_the_fused_kernel(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: (calls.append(1), sdpa(*a, **k))[1]
    )
    model = tiny_vit(prefix=1, depth=4)
    model(X)
    assert len(calls) == 4
    calls.clear()
    apply_reducer(model, Recorder([Location(Site.INSIDE, 2)]))
    model(X)
    assert len(calls) == 3  # blocks 0, 1, 3 fused; block 2 computes the probabilities asked for
    calls.clear()
    remove_reducer(model)
    apply_reducer(model, TopK([2], [0.5]))
    model(X)
    assert len(calls) == 4  # Top-K reads the CLS row only: computed beside the fused kernel
    calls.clear()
    remove_reducer(model)
    apply_reducer(model, ToMe([0, 1, 2, 3], [2, 2, 2, 2]))
    model(X)
    assert len(calls) == 4  # keys and the proportional-attention bias keep SDPA


def test_proportional_attention_biases_later_blocks_by_log_size():
    model = tiny_vit(prefix=1, depth=3).double()
    tome = ToMe([0], [4], prop_attn=True)
    apply_reducer(model, tome)
    with_bias = model(X.double())
    tome.prop_attn = False
    without = model(X.double())
    assert model.last_tokens.size.sum(1).flatten().tolist() == [17.0] * 3
    assert not torch.allclose(with_bias, without)


def test_source_tracing_accounts_for_every_input_token():
    model = tiny_vit(prefix=2)
    apply_reducer(model, RandomDrop([0], [0.5]), trace_sources=True)
    model(X)
    ((loc, source),) = model.last_trace
    assert loc == Location(Site.AFTER, 0) and source.shape == (3, 2 + 8, 18)
    assert torch.equal(source[:, :2, :2], torch.eye(2, dtype=torch.bool).expand(3, 2, 2))
    assert (source.sum(-1) == 1).all()  # dropping never merges
    assert (source.sum(1)[:, 2:].sum(-1) == 8).all()


def test_reduction_can_be_switched_off_for_full_token_passes():
    model = tiny_vit(prefix=1)
    full = model(X)
    apply_reducer(model, TopK([1], [0.25]))
    pruned = model(X)
    with model.reduction_disabled():
        assert torch.allclose(model(X), full, atol=1e-6)
    assert torch.allclose(model(X), pruned)


def test_random_drop_is_reproducible_by_seed():
    model = tiny_vit(prefix=1)
    reducer = RandomDrop([1], [0.5], seed=3)
    apply_reducer(model, reducer, trace_sources=True)
    model(X)
    first = model.last_tokens.source.clone()
    reducer.reset_generators()
    model(X)
    assert torch.equal(model.last_tokens.source, first)
    model(X)
    assert not torch.equal(model.last_tokens.source, first)
    other = RandomDrop([1], [0.5], seed=4)
    apply_reducer(model, other, trace_sources=True)
    model(X)
    assert not torch.equal(model.last_tokens.source, first)


@pytest.mark.parametrize(
    "make,prefix,message",
    [
        (lambda: TopK([1], [0.5]), 0, "no CLS token.*use a CLS-token model"),
        (lambda: TopK([7], [0.5]), 1, "acts inside block 7, but the backbone has 4 blocks.*0..3"),
        (lambda: RandomDrop([1], [0.01]), 1, "would keep 0 of 16 tokens.*at least one token"),
        (lambda: ToMe([1], [12], strict_half=True), 1, "merges at most half.*r=12 > 8.*keep_rate >= 0.5"),
    ],
)
def test_impossible_requests_fail_before_the_model_runs(make, prefix, message):
    model = tiny_vit(prefix=prefix)
    with pytest.raises(ReductionError, match=message):
        apply_reducer(model, make())


def test_rates_list_must_match_the_locations():
    with pytest.raises(ReductionError, match=r"2 rates \[0.5, 0.5\] for 3 locations \[2, 3, 4\]"):
        TopK([2, 3, 4], [0.5, 0.5])


def test_backbone_info_reads_the_model():
    info = backbone_info(tiny_vit(prefix=2))
    assert (info.depth, info.num_prefix, info.num_patches, info.distilled, info.has_class_token) == (
        4,
        2,
        16,
        True,
        True,
    )
    assert backbone_info(tiny_vit(prefix=0)).global_pool == "avg"


def test_tokens_keep_gathers_every_tracked_field():
    x = torch.arange(2 * 5 * 1.0).view(1, 5, 2)
    t = Tokens(x, 1, size=torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0]]]), policy=torch.ones(1, 5, 1))
    kept = t.keep(torch.tensor([[3, 0]]))
    assert kept.x[0, :, 0].tolist() == [0.0, 8.0, 2.0]
    assert kept.size.flatten().tolist() == [1.0, 5.0, 2.0]


def test_complement_lists_the_untaken_indices_ascending():
    idx = torch.tensor([[4, 0, 2], [1, 5, 3]])
    assert complement(idx, 6).tolist() == [[1, 3, 5], [0, 2, 4]]


def test_gather_rows_is_torch_gather_for_any_row_shape_and_a_strided_input():
    x = torch.randn(3, 8, 4)[:, ::2]  # strided, as ToMe's sets A and B
    idx = torch.tensor([[1, 2], [0, 3], [3, 3]])
    assert torch.equal(gather_rows(x, idx), x.gather(1, idx[..., None].expand(-1, -1, 4)))
    scores = torch.randn(3, 5)
    assert torch.equal(gather_rows(scores, idx), scores.gather(1, idx))
    grouped = torch.randint(0, 4, (3, 2, 5))  # [B, k, m] indices
    assert torch.equal(gather_rows(x, grouped), torch.stack([x[b][grouped[b]] for b in range(3)]))
