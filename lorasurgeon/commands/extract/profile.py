"""extract --for vllm|llama.cpp: the adapter made the way that consumer computes it, or refused by name.

Extract's own config gives each module's scale 1 by alpha_pattern (alpha = rank); llama.cpp reads one
alpha for the file and older vLLM ignores the pattern. For a consumer, lora_alpha = r (the adapter's
rank) stays, alpha_pattern goes, and a module of rank k carries k / r in its B: alpha / k · (k / r) · B A
= B A for everyone. What the consumer cannot take is refused: stacked experts (one rank per stack),
biases (lora_bias), whole tensors (all for llama.cpp; all but classifier/score for vLLM), a rank
above vLLM's 512. Which whole tensors and ranks it takes, and how a scale is folded, are the consumer's own
(``lorasurgeon.consumers``). This decides the scales from the first pass's results; the finishing pass
(``assemble.CutOp``) writes each B once, scaled.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...consumers import consumer
from ...errors import UnsupportedError
from .report import OpInfo
from .settings import ExtractSettings


def fold_for(infos: Sequence[OpInfo], settings: ExtractSettings, rank: int) -> dict[str, float]:
    """Per low-rank module whose rank is not ``rank``, the factor its B is scaled by (its rank / ``rank``, as
    the consumer folds it), after refusing what ``settings.for_`` cannot load.

    Raises:
        UnsupportedError: stacked experts, biases, whole tensors or a rank the consumer does not take.
    """
    assert settings.for_ is not None
    target = consumer(settings.for_, "--for")
    found = []
    if any(i.op.experts is not None and i.status == "lowrank" for i in infos):
        found.append("stacked MoE experts (--exclude them)")
    if any(i.status == "bias" for i in infos):
        found.append("bias changes as lora_B.bias (--extras skip)")
    whole = [i.op.name for i in infos if i.status == "full" and not target.loads_whole(i.op.name)]
    if whole:
        found.append(f"whole tensors {whole[:3]} (--extras skip, --embeddings lowrank)")
    lowrank = [i for i in infos if i.status == "lowrank" and i.stats is not None and i.op.experts is None]
    top = max((i.stats.rank for i in lowrank if i.stats is not None), default=0)
    if target.too_high(top):
        found.append(f"rank {top} above {target.rank_limit} {target.max_rank} (--max-rank)")
    if found:
        raise UnsupportedError(f"--for {target.name}: the adapter would hold {'; '.join(found)}")
    scales = {}
    for info in lowrank:
        assert info.stats is not None
        k = info.stats.rank
        if k != rank:  # extract's factors are the change itself (scale 1); the config's alpha is ``rank``
            scales[info.op.module] = target.fold(1.0, k, rank)
    return scales
