"""Learned methods (TNT, DynamicViT, dTPS): their forwards and losses worked out by hand, their
trained-parameter files, and the early errors of docs/methods/tnt.md, docs/methods/dynamicvit.md
and docs/methods/dtps.md."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.layers import Attention

from helpers import compose_config, run_py, tiny_vit
from tnt_lightning.engine import AttentionNeeds, ReductionError, Tokens, apply_reducer, backbone_info
from tnt_lightning.engine import attention as engine_attention
from tnt_lightning.engine.attention import (
    attend,
    official_rounding,
    official_rounding_enabled,
    softmax_with_policy,
)
from tnt_lightning.lit import OptimConfig, TokenReductionModule
from tnt_lightning.methods import DTPS, TNT, DynamicViT, build_reducer
from tnt_lightning.models import create_model, save_artefact
from tnt_lightning.models.trained import (
    TrainedParametersError,
    load_trained,
    recipe,
    training_dir,
    training_identity,
)
from tnt_lightning.tasks.train import check_can_provide

torch.set_num_threads(1)


def kept_patches(model, step: int = -1) -> torch.Tensor:
    """Original patch indices [B, k] of the tokens that survive reduction step ``step``."""
    _, source = model.last_trace[step]
    p = model.num_prefix_tokens
    return source[:, p:, p:].float().argmax(-1)


def block_output(model, block: int, x: torch.Tensor) -> torch.Tensor:
    """Block ``block``'s output in an unreduced forward."""
    out = {}
    handle = model.blocks[block].register_forward_hook(lambda m, i, o: out.setdefault("x", o))
    with torch.no_grad(), model.reduction_disabled():
        model(x)
    handle.remove()
    return out["x"]


# -- TNT: training noise ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha_norm_train", [False, True])
def test_tnt_noise_is_beta_times_one_minus_alpha_on_patches_only(alpha_norm_train):
    model = tiny_vit(prefix=2)
    tnt = TNT(
        backbone_info(model),
        "single",
        [1],
        [0.5],
        noise_blocks=2,
        beta=0.3,
        alpha_norm_train=alpha_norm_train,
    )
    x = torch.randn(3, 18, 48)
    torch.manual_seed(7)
    out = tnt.add_noise(0, Tokens(x, 2))
    torch.manual_seed(7)
    eps = torch.randn(3, 16, 48)
    alpha = tnt.alpha_heads[0](x[:, 2:]).squeeze(-1).softmax(-1)
    stream = F.layer_norm(x, (48,), eps=1e-6) if alpha_norm_train else x
    torch.testing.assert_close(out.x[:, :2], stream[:, :2])
    torch.testing.assert_close(out.x[:, 2:], stream[:, 2:] + 0.3 * (1 - alpha).unsqueeze(-1) * eps)
    torch.testing.assert_close(tnt.last_alpha[0].sum(-1), torch.ones(3))


def test_tnt_beta_is_a_standard_deviation_unless_told_it_is_a_variance():
    info = backbone_info(tiny_vit())
    assert TNT(info, "single", [1], [0.5], noise_blocks=2, beta=0.04).beta == 0.04
    assert TNT(
        info, "single", [1], [0.5], noise_blocks=2, beta=0.04, beta_is_variance=True
    ).beta == pytest.approx(0.2)


def test_tnt_training_adds_noise_after_the_first_blocks_and_trains_only_their_heads():
    model = tiny_vit(prefix=1, depth=4)
    tnt = TNT(backbone_info(model), "single", [1], [0.5], noise_blocks=2)
    apply_reducer(model, tnt)
    module = TokenReductionModule(model, 10, OptimConfig(lr=1e-3))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "reducer.alpha_heads.0.weight",
        "reducer.alpha_heads.0.bias",
        "reducer.alpha_heads.1.weight",
        "reducer.alpha_heads.1.bias",
    ]
    module._set_modes()
    out = tnt.training_loss(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), 0.1)
    assert len(tnt.last_alpha) == 2 and model.last_tokens.n == 16  # noise only, nothing pruned
    out.loss.backward()
    assert tnt.alpha_heads[1].weight.grad.abs().sum() > 0
    assert tnt.alpha_heads[2].weight.grad is None and model.blocks[0].mlp.fc1.weight.grad is None
    assert out.stats["alpha_entropy"] <= out.stats["alpha_entropy_uniform"] + 1e-6


def test_tnt_loss_is_on_the_cls_head_of_a_distilled_model():
    model = tiny_vit(prefix=2)
    tnt = TNT(backbone_info(model), "single", [1], [0.5], noise_blocks=2, beta=0.0, alpha_norm_train=False)
    apply_reducer(model, tnt).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 5])
    out = tnt.training_loss(model, x, y, 0.0)
    with model.reduction_disabled():
        features = model.forward_features(x)
    torch.testing.assert_close(out.logits, model.head(features[:, 0]))
    torch.testing.assert_close(out.loss, F.cross_entropy(model.head(features[:, 0]), y))


# -- TNT: inference --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_tnt_without_similarity_keeps_the_top_k_by_alpha_in_descending_order(prefix):
    model = tiny_vit(prefix=prefix)
    tnt = TNT(backbone_info(model), "single", [1], [0.5], noise_blocks=2, similarity="none")
    apply_reducer(model, tnt, trace_sources=True)
    x = torch.randn(2, 3, 32, 32)
    patches = block_output(model, 1, x)[:, prefix:]
    alpha = tnt.alpha_heads[1](patches).squeeze(-1).softmax(-1)
    with torch.no_grad():
        model(x)
    assert torch.equal(kept_patches(model), alpha.topk(8, dim=1).indices)


def test_tnt_single_layer_similarity_removes_s_of_the_top_k_plus_s():
    model = tiny_vit(prefix=1)
    tnt = TNT(backbone_info(model), "single", [1], [0.5], noise_blocks=2, similarity_tokens=3, seed=4)
    apply_reducer(model, tnt, trace_sources=True)
    x = torch.randn(2, 3, 32, 32)
    alpha = tnt.alpha_heads[1](block_output(model, 1, x)[:, 1:]).squeeze(-1).softmax(-1)
    candidates = alpha.topk(11, dim=1).indices
    with torch.no_grad():
        first = model(x)
        kept = kept_patches(model)
        assert kept.shape == (2, 8)
        for b in range(2):
            assert set(kept[b].tolist()) < set(candidates[b].tolist())
            order = alpha[b, kept[b]]
            assert torch.all(order[:-1] >= order[1:])  # survivors ordered by alpha
        tnt.reset_generators()
        torch.testing.assert_close(model(x), first)  # seeded: restarting the draws repeats the run


def test_tnt_multi_layer_prunes_s_before_block_0_then_top_k_after_each_location():
    model = tiny_vit(prefix=1, depth=4)
    tnt = TNT(backbone_info(model), "multi", [1, 2], [0.5, 1.0], noise_blocks=3, pre_similarity_tokens=4)
    apply_reducer(model, tnt, trace_sources=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    counts = [source.shape[1] - 1 for _, source in model.last_trace]
    assert counts == [12, 6]  # 16 - 4, then int(12 * 0.5); rate 1.0 at block 2 is skipped


def test_tnt_clamps_s_so_that_the_partition_can_remove_it(caplog):
    info = backbone_info(tiny_vit())
    tnt = TNT(info, "single", [1], [0.875], noise_blocks=2, similarity_tokens=5)
    tnt.bind(info)
    assert tnt.single_s == 2 and "using s=2" in caplog.text  # k = 14 of 16: only 2 candidates spare


def test_tnt_refuses_a_location_whose_head_was_never_trained():
    model = tiny_vit(depth=4)
    with pytest.raises(ReductionError, match=r"after block\(s\) \[3\].*0\.\.1"):
        apply_reducer(model, TNT(backbone_info(model), "single", [3], [0.5], noise_blocks=2))


def test_tnt_location_5_fails_before_anything_is_trained(tmp_path):
    proc = run_py(["method=tnt", "method.single_block=5", "logger=csv"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "only the alpha heads of blocks 0..4 are trained" in proc.stderr
    assert not list((tmp_path / "cache").rglob("*.pth"))  # neither the backbone nor the heads trained


def test_tnt_heads_do_not_depend_on_the_keep_rate(tmp_path):
    dirs = set()
    for k in (0.2, 0.8):
        cfg = compose_config(["method=tnt", f"keep_rate={k}"], tmp_path)
        spec = instantiate(cfg.model)
        reducer, _ = build_reducer(
            cfg.method, cfg.schedule, k, spec.pruning, backbone_info(create_model(spec))
        )
        dirs.add(training_dir(cfg, spec, reducer))
    assert len(dirs) == 1


# -- DynamicViT ------------------------------------------------------------------------------------


def test_dynamicvit_keeps_int_n0_rho_j_of_the_initial_tokens_ranked_by_its_predictor():
    model = tiny_vit(prefix=1, depth=4)
    dvit = DynamicViT.from_schedule("multi", [0, 1, 2], [0.7, 0.7, 0.7], backbone_info(model))
    assert dvit.keep_ratios == pytest.approx([0.7, 0.49, 0.343])
    apply_reducer(model, dvit, trace_sources=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        assert [s.shape[1] - 1 for _, s in model.last_trace] == [11, 7, 5]
        patches = block_output(model, 0, x)[:, 1:]
        keep_logp = dvit.score_predictor[0](patches, torch.ones(2, 16, 1))[..., 0]
    assert torch.equal(kept_patches(model, 0), keep_logp.argsort(dim=1, descending=True)[:, :11])


@pytest.mark.parametrize("rho", [0.0, 1.0, 1.2, -0.5])
def test_dynamicvit_rho_outside_0_1_is_refused(rho):
    with pytest.raises(ReductionError, match=rf"rho={rho} is outside \(0, 1\)"):
        DynamicViT(backbone_info(tiny_vit()), [0, 1], [0.5, rho])


def test_dynamicvit_keep_rate_1_is_refused_by_the_config(tmp_path):
    cfg = compose_config(["method=dynamicvit", "keep_rate=1.0", "schedule=multi"], tmp_path)
    spec = instantiate(cfg.model)
    with pytest.raises(ReductionError, match="outside"):
        build_reducer(cfg.method, cfg.schedule, 1.0, spec.pruning, backbone_info(create_model(spec)))


@pytest.mark.parametrize("method", [DynamicViT, DTPS])
def test_dynamicvit_losses_when_every_token_is_kept(method):
    """A predictor certain to keep everything: nothing is masked, so the student is the teacher and
    both distillation terms vanish; the ratio loss is the mean of (1 - rho_j)^2."""
    model = tiny_vit(prefix=1, depth=4)
    dvit = method.from_schedule("multi", [0, 1], [0.5, 0.5], backbone_info(model), token_loss="mse")
    for predictor in dvit.score_predictor:
        torch.nn.init.zeros_(predictor.out_conv[4].weight)
        predictor.out_conv[4].bias.data = torch.tensor([50.0, -50.0])
    apply_reducer(model, dvit).train()
    model.reducer.train()
    model.blocks.eval()  # no drop path in the tiny model anyway; the teacher runs in eval mode
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    out = dvit.training_loss(model, x, y, 0.0)
    assert all(d.min() == 1 for d in dvit.decisions)
    with torch.no_grad(), model.reduction_disabled():
        teacher = model(x)
    torch.testing.assert_close(out.logits, teacher)
    assert out.stats["logit_kl"].abs() < 1e-6 and out.stats["token_loss"].abs() < 1e-10
    ratio = ((1 - 0.5) ** 2 + (1 - 0.25) ** 2) / 2
    torch.testing.assert_close(out.stats["ratio_loss"], torch.tensor(ratio))
    expected = F.cross_entropy(teacher, y) + 2.0 * ratio
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_masked_softmax_lets_a_query_attend_only_to_kept_keys_and_itself():
    scores = torch.tensor([[[[0.0, 1.0, 2.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]]])
    weights = softmax_with_policy(scores, torch.tensor([[[1.0], [0.0], [1.0]]]))
    e = torch.tensor([[1.0, 0.0, math.exp(2.0)], [1.0, 1.0, 1.0], [math.e, 0.0, 1.0]])
    torch.testing.assert_close(weights[0, 0], e / e.sum(-1, keepdim=True), atol=1e-5, rtol=0)
    assert weights[0, 0, 0, 1] < 1e-5  # the dropped key gets only the eps floor


def official_masked_softmax(scores, policy, eps=1e-6, rounded=False):
    """The official ``softmax_with_policy`` formula, left to autograd. ``rounded``: with its casts
    (the mask built in the policy's dtype, the row maximum subtracted in the scores' dtype, then
    the exponential, the mask and the normalisation in float32, the result cast back to the scores'
    dtype); without them, every op in the inputs' dtype."""
    n = scores.shape[-1]
    allowed = policy.reshape(policy.shape[0], 1, 1, n)
    allowed = allowed + (1.0 - allowed) * torch.eye(n, dtype=allowed.dtype).view(1, 1, n, n)
    shifted = scores - scores.max(dim=-1, keepdim=True).values
    if rounded:
        shifted, allowed = shifted.float(), allowed.float()
    weights = shifted.exp() * allowed
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).to(scores.dtype)


def random_policy(batch: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The CLS token kept, then about half of the patches."""
    generator = torch.Generator().manual_seed(1)
    keep = torch.rand(batch, n - 1, 1, generator=generator) > 0.5
    return torch.cat([torch.ones(batch, 1, 1, dtype=dtype), keep.to(dtype)], dim=1)


def masked_softmax_inputs(dtype: torch.dtype, batch: int = 2, heads: int = 3, n: int = 9):
    """Scores spread as trained attention logits are, a policy, an upstream gradient."""
    generator = torch.Generator().manual_seed(0)
    scores = 4 * torch.randn(batch, heads, n, n, generator=generator, dtype=torch.float64)
    upstream = torch.randn(batch, heads, n, n, generator=generator, dtype=torch.float64)
    policy = random_policy(batch, n, dtype)
    return scores.to(dtype).requires_grad_(True), policy.requires_grad_(True), upstream.to(dtype)


def test_masked_softmax_gradients_equal_autograd_of_the_official_formula():
    torch.manual_seed(0)
    scores = torch.randn(3, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    policy = (torch.rand(3, 7, 1, dtype=torch.float64) > 0.4).double().requires_grad_(True)
    upstream = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    expected = official_masked_softmax(scores, policy)
    got = softmax_with_policy(scores, policy)
    torch.testing.assert_close(got, expected, atol=1e-15, rtol=1e-12)
    for g, e in zip(
        torch.autograd.grad(got, (scores, policy), upstream),
        torch.autograd.grad(expected, (scores, policy), upstream),
        strict=True,
    ):
        torch.testing.assert_close(g, e, atol=1e-14, rtol=1e-10)
    assert torch.autograd.gradcheck(softmax_with_policy, (scores, policy))
    half = softmax_with_policy(scores.detach().bfloat16(), policy.detach().bfloat16())
    assert half.dtype == torch.bfloat16  # computed in fp32, returned in the caller's dtype


@pytest.mark.parametrize(
    ("dtype", "chunk_rows", "atol"),
    [(torch.float64, [(0, 5)], 1e-13), (torch.float32, [(0, 2), (2, 5)], 1e-5)],
)
def test_chunked_masked_attention_equals_the_unfused_path_and_its_gradients(
    monkeypatch, dtype, chunk_rows, atol
):
    """Masked training runs MaskedAttention a few images at a time (float64: the whole batch);
    asking for the probabilities forces the unfused path (scores, masked softmax, @ v) on the same
    layer and input."""
    torch.manual_seed(0)
    layer = Attention(dim=8, num_heads=2, qkv_bias=True).to(dtype)
    x = torch.randn(5, 6, 8, dtype=dtype, requires_grad=True)
    policy = torch.cat([torch.ones(5, 1, 1), (torch.rand(5, 5, 1) > 0.5).float()], 1).to(dtype)
    policy.requires_grad_(True)
    upstream = torch.randn(5, 6, 8, dtype=dtype)
    monkeypatch.setattr(engine_attention, "CHUNK_BYTES", 2 * 2 * 6 * 6 * dtype.itemsize)  # 2 images
    chunks = engine_attention.chunks(torch.empty(5, 2, 6, 4, dtype=dtype))
    assert [(c.start, c.stop) for c in chunks] == chunk_rows  # float32: no chunk of one image
    results = []
    for needs in (AttentionNeeds(), AttentionNeeds(probs=True)):
        out, info = attend(layer, x, needs, policy=policy)
        assert (info.probs is None) == (not needs.probs)
        inputs = (x, policy, *layer.parameters())
        results.append((out, torch.autograd.grad(out, inputs, upstream)))
    (chunked, chunked_grads), (unfused, unfused_grads) = results
    torch.testing.assert_close(chunked, unfused, atol=atol / 10, rtol=atol / 10)
    for got, expected in zip(chunked_grads, unfused_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("batch", [5, 8])
def test_masked_attention_in_float64_gives_the_whole_batch_products_bitwise(monkeypatch, batch):
    """However small the chunk budget, float64 masked attention equals the batched computation
    bit for bit: its forward equals the unfused path's, its gradients a whole-batch run's (a chunk
    of one image, or of three images of three heads, rounds float64 products differently)."""
    torch.manual_seed(0)
    layer = Attention(dim=48, num_heads=3, qkv_bias=True).double()
    x = torch.randn(batch, 17, 48, dtype=torch.float64)
    policy = torch.cat([torch.ones(batch, 1, 1), (torch.rand(batch, 16, 1) > 0.5).float()], 1).double()
    upstream = torch.randn(batch, 17, 48, dtype=torch.float64)

    def run(chunk_bytes, probs=False):
        monkeypatch.setattr(engine_attention, "CHUNK_BYTES", chunk_bytes)
        inputs = (x.clone().requires_grad_(True), policy.clone().requires_grad_(True), *layer.parameters())
        out, _ = attend(layer, inputs[0], AttentionNeeds(probs=probs), policy=inputs[1])
        return out, torch.autograd.grad(out, inputs, upstream)

    whole, whole_grads = run(1 << 40)
    unfused, _ = run(1 << 40, probs=True)
    assert torch.equal(whole, unfused)
    for images in (1, 2, 3):
        out, grads = run(images * 3 * 17 * 17 * 8)
        assert torch.equal(out, unfused)
        assert all(torch.equal(g, w) for g, w in zip(grads, whole_grads, strict=True))


def test_float32_chunks_are_never_one_image_of_a_larger_batch(monkeypatch):
    q = torch.empty(7, 2, 6, 4)
    monkeypatch.setattr(engine_attention, "CHUNK_BYTES", 2 * 6 * 6 * 4)  # a budget of one image
    assert [(c.start, c.stop) for c in engine_attention.chunks(q)] == [(0, 2), (2, 4), (4, 7)]
    monkeypatch.setattr(engine_attention, "CHUNK_BYTES", 3 * 2 * 6 * 6 * 4)
    assert [(c.start, c.stop) for c in engine_attention.chunks(q)] == [(0, 3), (3, 7)]
    assert [(c.start, c.stop) for c in engine_attention.chunks(q[:1])] == [(0, 1)]


# -- rounding as the official code (official_rounding) ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_official_rounding_gives_the_official_formula_and_its_gradients_bitwise(dtype):
    scores, policy, upstream = masked_softmax_inputs(dtype)
    expected = official_masked_softmax(scores, policy, rounded=True)
    expected_grads = torch.autograd.grad(expected, (scores, policy), upstream)
    assert not official_rounding_enabled()
    with official_rounding():
        got = softmax_with_policy(scores, policy)
    assert not official_rounding_enabled()
    explicit = softmax_with_policy(scores, policy, official=True)
    assert got.dtype == dtype and torch.equal(got, expected) and torch.equal(explicit, expected)
    grads = torch.autograd.grad(got, (scores, policy), upstream)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))


def test_official_rounding_runs_the_attention_layer_as_the_official_formula_bitwise():
    """Under official_rounding, masked attention (which would otherwise run MaskedAttention)
    computes ``softmax(q k^T) v`` with the official formula, forward and gradients bit for bit."""
    torch.manual_seed(0)
    layer = Attention(dim=48, num_heads=3, qkv_bias=True).double()
    x0 = torch.randn(4, 9, 48, dtype=torch.float64)
    policy0 = random_policy(4, 9, torch.float64)
    upstream = torch.randn(4, 9, 48, dtype=torch.float64)

    def reference(x, policy):
        qkv = layer.qkv(x).reshape(4, 9, 3, 3, 16).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = official_masked_softmax((q * layer.scale) @ k.transpose(-2, -1), policy, rounded=True)
        return layer.proj((probs @ v).transpose(1, 2).reshape(4, 9, 48))

    def run(forward):
        x, policy = x0.clone().requires_grad_(True), policy0.clone().requires_grad_(True)
        out = forward(x, policy)
        return out, torch.autograd.grad(out, (x, policy, *layer.parameters()), upstream)

    expected, expected_grads = run(reference)
    default, _ = run(lambda x, policy: attend(layer, x, policy=policy)[0])
    with official_rounding():
        got, grads = run(lambda x, policy: attend(layer, x, policy=policy)[0])
    assert not torch.equal(default, expected)  # float64 by default: no float32 rounding
    assert torch.equal(got, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))


def test_default_float64_masked_softmax_is_closer_to_exact_than_the_official_rounding():
    """Without official_rounding, float64 scores stay float64: the result differs from the
    official float32 rounding and is closer to the formula evaluated in extended precision."""
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("numpy's longdouble is no wider than float64 here")
    scores, policy, _ = masked_softmax_inputs(torch.float64)
    s = scores.detach().numpy().astype(np.longdouble)
    keys = policy.detach().numpy().astype(np.longdouble).reshape(2, 1, 1, 9)
    allowed = keys + (1 - keys) * np.eye(9, dtype=np.longdouble)
    weights = np.exp(s - s.max(axis=-1, keepdims=True)) * allowed
    eps = np.longdouble(1e-6)
    exact = (weights + eps / 9) / (weights.sum(axis=-1, keepdims=True) + eps)

    def error(probs):
        return float(np.abs(probs.detach().numpy().astype(np.longdouble) - exact).max())

    default = softmax_with_policy(scores, policy)
    rounded = softmax_with_policy(scores, policy, official=True)
    assert not torch.equal(default, rounded)
    assert error(default) < 1e-15 and error(rounded) > 1e-10


def test_bf16_masked_softmax_subtracts_the_max_in_float32_by_default():
    """bf16 scores: by default the whole softmax runs in float32 on them (only the result is
    rounded to bf16), within bf16 rounding of the float32 scores' probabilities; the official
    rounding subtracts the max in bf16, further from them."""
    scores, policy, _ = masked_softmax_inputs(torch.float32)
    scores, policy = scores.detach(), policy.detach()
    fp32 = softmax_with_policy(scores, policy)
    half = scores.bfloat16()
    default = softmax_with_policy(half, policy.bfloat16())
    assert default.dtype == torch.bfloat16
    assert torch.equal(default, softmax_with_policy(half.float(), policy.bfloat16().float()).bfloat16())
    torch.testing.assert_close(default.float(), fp32, atol=0.02, rtol=2**-7)
    official = softmax_with_policy(half, policy.bfloat16(), official=True)
    exact = softmax_with_policy(half.double(), policy.bfloat16().double())
    assert (default.double() - exact).abs().max() < (official.double() - exact).abs().max()


def test_official_rounding_option_rounds_the_training_step_only_and_keys_the_artefact(tmp_path):
    info = backbone_info(tiny_vit(prefix=1, depth=4))
    options = {"blocks": [0, 1], "keep_ratios": [0.7, 0.49]}
    rounded = DTPS(info, **options, official_rounding=True)
    assert "official_rounding" not in DynamicViT(info, **options).training_key()  # keys as before
    assert rounded.training_key()["official_rounding"] is True
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2])
    losses = []
    for reducer, context in ((rounded, False), (DTPS(info, **options), True), (DTPS(info, **options), False)):
        reducer.load_state_dict(rounded.state_dict())
        model = apply_reducer(tiny_vit(prefix=1, depth=4), reducer).double().train()
        torch.manual_seed(3)
        with official_rounding(context):
            losses.append(reducer.training_loss(model, x, y, 0.0).loss)
        assert not official_rounding_enabled()
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    cfg = compose_config(["method=dtps", "model=vit_cmnist", "method.official_rounding=true"], tmp_path)
    spec = instantiate(cfg.model)
    reducer, record = build_reducer(
        cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(create_model(spec))
    )
    assert reducer.official_rounding and record["official_rounding"] is True


# -- trained parameters: files, identities, early errors ----------------------------------------


def official_tnt_state(model, depth: int, dim: int) -> dict[str, torch.Tensor]:
    """The layout of a released TNT checkpoint: the whole model, heads at the top level."""
    state = dict(model.state_dict())
    for b in range(depth):
        state[f"alpha_heads.{b}.weight"] = torch.full((1, dim), float(b))
        state[f"alpha_heads.{b}.bias"] = torch.zeros(1)
    state["alpha_norm.weight"], state["alpha_norm.bias"] = torch.ones(dim), torch.zeros(dim)
    return state


def test_official_tnt_checkpoint_loads_without_a_key_map(tmp_path):
    model = tiny_vit(depth=4)
    path = tmp_path / "tnt_official.pth"
    torch.save({"model": official_tnt_state(model, 4, 48), "epoch": 39}, path)
    tnt = TNT(backbone_info(model), "single", [1], [0.5], noise_blocks=4)
    info = load_trained(tnt, path)
    assert info["source"].startswith("official:")
    assert torch.equal(tnt.alpha_heads[3].weight, torch.full((1, 48), 3.0))


def test_official_dynamicvit_key_names():
    dvit = DynamicViT(backbone_info(tiny_vit()), [0, 1], [0.7, 0.49])
    keys = set(dvit.state_dict())
    assert {
        "score_predictor.0.in_conv.0.weight",
        "score_predictor.0.in_conv.1.weight",
        "score_predictor.1.out_conv.0.weight",
        "score_predictor.1.out_conv.2.weight",
        "score_predictor.1.out_conv.4.bias",
    } <= keys


def test_a_checkpoint_for_another_backbone_or_method_is_refused(tmp_path):
    small, wide = tiny_vit(depth=4), tiny_vit(depth=4, dim=64)
    path = tmp_path / "wide.pth"
    torch.save({"model": official_tnt_state(wide, 4, 64)}, path)
    with pytest.raises(TrainedParametersError, match=r"alpha_heads.0.weight has shape \(1, 64\).*\(1, 48\)"):
        load_trained(TNT(backbone_info(small), "single", [1], [0.5], noise_blocks=4), path)
    ours = tmp_path / "trained.pth"
    torch.save({"method": "dynamicvit", "model": "vit_mnist", "identity": {}, "state_dict": {}}, ours)
    with pytest.raises(TrainedParametersError, match="method=dynamicvit, not tnt"):
        load_trained(TNT(backbone_info(small), "single", [1], [0.5], noise_blocks=4), ours)


def test_untrained_heads_with_training_off_fail_before_any_weights_load(tmp_path):
    cfg = compose_config(["method=tnt", "method.train.auto=false"], tmp_path)
    spec = instantiate(cfg.model)
    reducer, _ = build_reducer(
        cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(create_model(spec))
    )
    with pytest.raises(TrainedParametersError, match="no trained parameters.*method.train.auto=false"):
        check_can_provide(cfg, spec, reducer)


def test_dataset_overrides_adjust_the_recipe_per_method(tmp_path):
    tnt = recipe(compose_config(["method=tnt"], tmp_path))
    dvit = recipe(compose_config(["method=dynamicvit"], tmp_path))
    assert (tnt.epochs, tnt.mixup, tnt.base_lr, tnt.lr_batch) == (10, 0.0, 1e-3, None)
    assert (dvit.epochs, dvit.base_lr) == (10, 1e-3)
    bad = compose_config(["method=tnt", "+data.train_overrides.epoch=3"], tmp_path)
    with pytest.raises(ValueError, match=r"\['epoch'\].*allowed"):
        recipe(bad)


def test_checkpoints_hold_only_the_trained_parameters():
    model = tiny_vit(depth=4)
    apply_reducer(model, TNT(backbone_info(model), "single", [1], [0.5], noise_blocks=2))
    module = TokenReductionModule(model, 10, OptimConfig(lr=1e-3))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert sorted(checkpoint["state_dict"]) == [
        "model.reducer.alpha_heads.0.bias",
        "model.reducer.alpha_heads.0.weight",
        "model.reducer.alpha_heads.1.bias",
        "model.reducer.alpha_heads.1.weight",
    ]
    assert math.isclose(sum(v.numel() for v in checkpoint["state_dict"].values()), 2 * 49)


# -- backbone fine-tuning (method.train.backbone_lr_scale) ------------------------------------------


def _dynamicvit_module(scale: float) -> TokenReductionModule:
    model = tiny_vit(depth=4)
    apply_reducer(model, DynamicViT(backbone_info(model), [1], [0.5]))
    return TokenReductionModule(model, 10, OptimConfig(lr=1e-3), backbone_lr_scale=scale)


def test_a_fine_tuned_backbone_trains_at_its_fraction_of_the_lr_against_a_frozen_teacher():
    module = _dynamicvit_module(0.01)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == pytest.approx([1e-5, 1e-3])
    backbone = dict(module.backbone_parameters())
    assert "blocks.0.attn.qkv.weight" in backbone and not any(n.startswith("reducer.") for n in backbone)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    before = module.model.blocks[0].attn.qkv.weight.detach().clone()
    module._set_modes()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = module.reducer.training_loss(module.model, x, y, 0.1, module.teacher)
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(module.model.blocks[0].attn.qkv.weight, before)
    assert torch.equal(module.teacher.blocks[0].attn.qkv.weight, before)  # the pretrained teacher
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert "model.blocks.0.attn.qkv.weight" in checkpoint["state_dict"]
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])


def test_a_frozen_backbone_gets_no_optimizer_group_and_no_teacher_copy():
    module = _dynamicvit_module(0.0)
    assert module.teacher is None and module.backbone_parameters() == []
    assert all(n.startswith("reducer.") for n, p in module.model.named_parameters() if p.requires_grad)


def test_backbone_fine_tuning_is_in_the_artefact_key_and_frozen_keeps_the_old_key(tmp_path):
    def key(*overrides):
        cfg = compose_config(
            ["method=dynamicvit", "model=vit_cmnist", "data=cluttered_mnist", *overrides], tmp_path
        )
        spec = instantiate(cfg.model)
        reducer, _ = build_reducer(
            cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(create_model(spec))
        )
        return training_dir(cfg, spec, reducer), training_identity(cfg, spec, reducer)

    tuned, frozen = key("data.train_overrides.dynamicvit.backbone_lr_scale=0.01"), key()  # the study freezes
    assert tuned[1]["recipe"]["backbone_lr_scale"] == 0.01  # the official recipe's
    assert tuned[0] != frozen[0]
    assert "backbone_lr_scale" not in frozen[1]["recipe"]  # artefacts trained before the option match


def test_trained_file_with_a_fine_tuned_backbone_loads_it_into_the_model(tmp_path):
    model = tiny_vit(depth=4)
    reducer = DynamicViT(backbone_info(model), [1], [0.5])
    tuned = tiny_vit(depth=4, seed=1).state_dict()
    path = tmp_path / "trained.pth"
    save_artefact(
        {
            "method": "dynamicvit",
            "model": "tiny",
            "identity": {"method": reducer.training_key()},
            "state_dict": dict(reducer.state_dict()),
            "backbone": tuned,
        },
        path,
    )
    info = load_trained(reducer, path, model=model)
    assert "fine-tuned" in info["backbone"]
    assert torch.equal(model.blocks[2].mlp.fc1.weight, tuned["blocks.2.mlp.fc1.weight"])


def test_a_recipe_whose_lr_never_leaves_warm_up_is_refused_and_the_study_recipe_reaches_its_lr(tmp_path):
    """Per-epoch stepping (TNT's and dTPS's official schedule) trains epochs 0 and 1 at warmup_lr:
    with the embedded study's single epoch a training would run at 1e-6 throughout."""
    from tnt_lightning.errors import ConfigError
    from tnt_lightning.lit.optim import build_optimizer
    from tnt_lightning.tasks.train import check_schedule_reaches_lr

    study = ["model=vit_cmnist", "data=cluttered_mnist"]
    for method in ("tnt", "dtps"):
        bad = compose_config([f"method={method}", *study, "data.train_overrides.schedule=epoch"], tmp_path)
        with pytest.raises(
            ConfigError, match=r"schedule=epoch with epochs=1 .* warmup_lr=1e-06.*schedule=step"
        ):
            check_schedule_reaches_lr(bad)
        cfg = compose_config([f"method={method}", *study], tmp_path)
        check_schedule_reaches_lr(cfg)
        rec = recipe(cfg)
        optim = OptimConfig(
            lr=1e-3, warmup_epochs=rec.warmup_epochs, warmup_lr=rec.warmup_lr, schedule=rec.schedule
        )
        optimizer, scheduler = build_optimizer([("w", torch.nn.Parameter(torch.zeros(1)))], optim, 125, 1)
        lrs = []
        for _ in range(125):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert max(lrs) == pytest.approx(1e-3, rel=0.05)
