"""L2-norm pruning, an out-of-tree method: keep the int(n*K) patches whose features have the largest norm.

A large token norm is a cheap, attention-free saliency signal; acting after a block, it needs no CLS
token. Registered under ``method=l2norm``; its config is ``conf/method/l2norm.yaml`` beside this file.
"""

from tnt_lightning.engine import AttentionInfo, Site, Tokens, register_method
from tnt_lightning.methods import StagedReducer


@register_method(
    "l2norm",
    kind="training-free",
    operation="pruning",
    keep_rule="int(n*K) of the current n",
    paper="example: largest token L2 norm",
    reference="none (an example)",
    order=100,
    colour="#393b79",
)
class L2Norm(StagedReducer):
    site = Site.AFTER

    def count_after(self, n: int, rate: float) -> int:
        return int(n * rate)

    def prune(self, tokens: Tokens, rate: float, attn: AttentionInfo | None) -> Tokens:
        norms = tokens.patches.norm(dim=-1)
        return tokens.keep(norms.topk(self.count_after(tokens.n, rate), dim=1).indices.sort(dim=1).values)
