"""ATC: the three linkages on hand-made points, the cluster means and sizes, the counts, the FLOPs.

What the float64 comparison with the official code (JoakimHaurum/ATC, scikit-learn's
AgglomerativeClustering) showed, kept without it: the clusters are the agglomerative clustering of
the cosine distances of the keys averaged over heads, prefix left out; each cluster becomes its
members' size-weighted mean (equal weights when proportional attention is off); stage j keeps
``int(n0 * rho ** j)`` clusters.
"""

from __future__ import annotations

import pytest
import torch

import tnt_lightning as tl
from helpers import tiny_vit
from tnt_lightning.engine import AttentionInfo, Location, ReductionError, Site, Tokens, apply_reducer
from tnt_lightning.measure.flops import count_macs
from tnt_lightning.methods.atc import ATC, agglomerate, cosine_distances

INSIDE = Location(Site.INSIDE, 0)
# Six points on a line, no two pairs equally far: each linkage cuts them differently into 2 clusters.
LINE = torch.tensor([2.0, 5.0, 6.0, 12.0, 20.0, 29.0], dtype=torch.float64)


def partition(labels: torch.Tensor) -> set[frozenset[int]]:
    """The clusters of one image's ``labels`` as sets of point indices."""
    groups: dict[int, set[int]] = {}
    for point, cluster in enumerate(labels.tolist()):
        groups.setdefault(cluster, set()).add(point)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize(
    "linkage,clusters",
    [
        # gaps 3, 1, 6, 8, 9: single linkage joins the four smallest gaps and leaves 29 alone
        ("single", [{0, 1, 2, 3, 4}, {5}]),
        # {5,6} (1), {2,5,6} (max 4), {12,20} (8), then {12,20}-29 is 17 < {2,5,6}-{12,20} 18
        ("complete", [{0, 1, 2}, {3, 4, 5}]),
        # {5,6} (1), {2,5,6} (3.5), {2,5,6}+12 (23/3 < 8), then 20-29 (9 < 55/4)
        ("average", [{0, 1, 2, 3}, {4, 5}]),
    ],
)
def test_each_linkage_cuts_the_hand_made_line_as_worked_out_by_hand(linkage, clusters):
    distances = (LINE[:, None] - LINE[None, :]).abs()[None]
    labels = agglomerate(distances, 2, linkage)
    assert partition(labels[0]) == {frozenset(c) for c in clusters}
    assert labels[0, 0] == 0  # clusters are numbered by their first member


def test_no_join_leaves_every_point_its_own_cluster_and_one_cluster_takes_all():
    distances = (LINE[:, None] - LINE[None, :]).abs()[None]
    assert agglomerate(distances, 6, "average").tolist() == [[0, 1, 2, 3, 4, 5]]
    assert agglomerate(distances, 1, "single").tolist() == [[0] * 6]


def test_an_unknown_linkage_is_refused():
    with pytest.raises(ReductionError, match="ward"):
        ATC([0], [0.5], linkage="ward")


def hand_made(heads: int = 2):
    """One image: CLS + 6 patches whose keys (the same in every head) point along three directions,
    patches {0, 3}, {1, 4, 5} and {2} each sharing one (at different lengths)."""
    direction = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    which = [0, 1, 2, 0, 1, 1]
    patch_keys = torch.stack([direction[w] * (1 + i) for i, w in enumerate(which)])
    keys = torch.cat([torch.ones(1, 3, dtype=torch.float64), patch_keys])[None, None].expand(1, heads, 7, 3)
    x = torch.arange(7 * 2, dtype=torch.float64).reshape(1, 7, 2)
    return Tokens(x, 1), AttentionInfo(keys=keys)


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_clusters_of_equal_key_directions_become_their_mean_tokens(linkage):
    tokens, attn = hand_made()
    atc = ATC([0], [0.5], linkage=linkage)
    atc.counts = [3]
    out = atc.reduce(INSIDE, tokens, attn)
    assert atc.labels[INSIDE].tolist() == [[0, 1, 2, 0, 1, 1]]
    patches = tokens.patches[0]
    want = torch.stack([patches[[0, 3]].mean(0), patches[[1, 4, 5]].mean(0), patches[2]])
    torch.testing.assert_close(out.patches[0], want)
    assert torch.equal(out.prefix, tokens.prefix)
    assert out.size[0, :, 0].tolist() == [1, 2, 3, 1]  # CLS, then the cluster sizes


def test_sizes_weight_the_means_and_add_up_and_without_prop_attn_they_are_ignored():
    tokens, attn = hand_made()
    tokens.size = torch.tensor([1.0, 1, 1, 1, 3, 1, 2], dtype=torch.float64)[None, :, None]
    weighted = ATC([0], [0.5])
    weighted.counts = [3]
    out = weighted.reduce(INSIDE, tokens, attn)
    p = tokens.patches[0]
    torch.testing.assert_close(out.patches[0, 0], (p[0] + 3 * p[3]) / 4)
    torch.testing.assert_close(out.patches[0, 1], (p[1] + p[4] + 2 * p[5]) / 4)
    assert out.size[0, :, 0].tolist() == [1, 4, 4, 1]
    equal = ATC([0], [0.5], prop_attn=False)
    equal.counts = [3]
    out = equal.reduce(INSIDE, tokens, attn)
    torch.testing.assert_close(out.patches[0, 0], (p[0] + p[3]) / 2)  # the official code without it
    assert out.size is None


def test_the_distance_is_cosine_on_the_keys_averaged_over_heads():
    tokens, attn = hand_made()
    keys = attn.keys.clone()
    keys[0, 0, 1:] = torch.randn(6, 3, dtype=torch.float64)  # head 0 alone would cluster otherwise
    keys[0, 1, 1:] = 2 * attn.keys[0, 1, 1:] - keys[0, 0, 1:]  # but the mean over heads is unchanged
    atc = ATC([0], [0.5])
    atc.counts = [3]
    atc.reduce(INSIDE, tokens, AttentionInfo(keys=keys))
    assert atc.labels[INSIDE].tolist() == [[0, 1, 2, 0, 1, 1]]
    metric = keys.mean(dim=1)[:, 1:]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(cosine_distances(metric), 1 - unit @ unit.transpose(1, 2))


def test_a_batch_gives_each_image_what_it_gets_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 2 + 20, 8, dtype=torch.float64)
    keys = torch.randn(3, 2, 22, 4, dtype=torch.float64)
    atc = ATC([0], [0.5], linkage="complete")
    atc.counts = [7]
    batched = atc.reduce(INSIDE, Tokens(x, 2), AttentionInfo(keys=keys))
    for i in range(3):
        alone = atc.reduce(INSIDE, Tokens(x[i : i + 1], 2), AttentionInfo(keys=keys[i : i + 1]))
        torch.testing.assert_close(batched.x[i : i + 1], alone.x)
        torch.testing.assert_close(batched.size[i : i + 1], alone.size)


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_the_clusters_are_scipys_and_scikit_learns(linkage):
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    cluster = pytest.importorskip("sklearn.cluster")
    torch.manual_seed(1)
    metric = torch.randn(3, 60, 16, dtype=torch.float64)
    distances = cosine_distances(metric)
    labels = agglomerate(distances, 17, linkage)
    upper = torch.triu_indices(60, 60, offset=1)
    for image in range(3):
        square = distances[image].numpy()
        tree = hierarchy.linkage(square[upper[0], upper[1]], method=linkage)
        scipy_labels = torch.from_numpy(hierarchy.cut_tree(tree, n_clusters=17)[:, 0])
        sklearn_labels = cluster.AgglomerativeClustering(17, metric="precomputed", linkage=linkage)
        sklearn_labels = torch.from_numpy(sklearn_labels.fit(square).labels_)
        assert partition(labels[image]) == partition(scipy_labels) == partition(sklearn_labels)


def test_the_official_deit_counts_and_the_config_defaults():
    model = tl.prune(tiny_vit(img=224, patch=16, depth=12), "atc", schedule="multi", keep_rate=0.7)
    atc = model.reducer
    assert isinstance(atc, ATC) and atc.blocks == [3, 6, 9]
    assert (atc.linkage, atc.prop_attn) == ("average", True)
    assert list(atc.expected_tokens().values()) == [137, 96, 67]  # int(196 * 0.7 ** j)
    single = tl.prune(tiny_vit(img=224, patch=16, depth=12), "atc", keep_rate=0.3).reducer
    assert [loc.site for loc in single.locations()] == [Site.INSIDE]
    assert list(single.expected_tokens().values()) == [58]


def test_the_flop_count_is_the_backbone_plus_the_key_similarity_by_hand():
    """CLS + 16 patches, width 48, 4 heads, MLP 96; ATC inside block 1 keeps 8 clusters."""
    model = apply_reducer(tiny_vit(depth=4), ATC([1], [0.5]))

    def attention(n: int) -> int:  # LN1, qkv, Q.K^T, A.V, projection
        return 5 * n * 48 + 3 * n * 48 * 48 + 2 * n * n * 48 + n * 48 * 48

    def mlp(n: int) -> int:  # LN2, fc1, fc2
        return 5 * n * 48 + 2 * n * 48 * 96

    patch_embed, final_norm, head = 16 * 48 * 3 * 8 * 8, 5 * 9 * 48, 48 * 10
    similarity = 16 * 16 * 12  # n^2 * D/H: the cosine similarities of the 16 patches' mean keys
    blocks = attention(17) + mlp(17) + attention(17) + mlp(9) + 2 * (attention(9) + mlp(9))
    expected = patch_embed + blocks + similarity + final_norm + head
    assert count_macs(model, torch.randn(1, 3, 32, 32)) == expected
