"""extract --for vllm|llama.cpp: the adapter made the way that consumer computes it, or refused by name.

Extract's own config gives each module's scale 1 by alpha_pattern (alpha = rank); llama.cpp reads one
alpha for the file and older vLLM ignores the pattern. For a consumer, lora_alpha = r (the adapter's
rank) stays, alpha_pattern goes, and a module of rank k carries k / r in its B: alpha / k · (k / r) · B A
= B A for everyone. What the consumer cannot take is refused: stacked experts (one rank per stack),
biases (lora_bias), whole tensors (all for llama.cpp; all but classifier/score for vLLM), a rank
above vLLM's 512.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...adapter.names import saved_key
from ...errors import UnsupportedError
from ...io.spool import SpoolWriter
from ...ops.lora import LAYER_KINDS
from ..check import VLLM_RANKS, vllm_loads_whole
from .report import OpInfo
from .settings import ExtractSettings


def fold_for(spool: SpoolWriter, infos: Sequence[OpInfo], settings: ExtractSettings, rank: int) -> None:
    """Scale each low-rank module's B by (its rank / ``rank``) in the spool, after refusing what
    ``settings.for_`` cannot load.

    Raises:
        UnsupportedError: stacked experts, biases, whole tensors or a rank the consumer does not take.
    """
    consumer = settings.for_
    assert consumer is not None
    found = []
    if any(i.op.experts is not None and i.status == "lowrank" for i in infos):
        found.append("stacked MoE experts (--exclude them)")
    if any(i.status == "bias" for i in infos):
        found.append("bias changes as lora_B.bias (--extras skip)")
    whole = [i.op.name for i in infos if i.status == "full"]
    if consumer == "vllm":
        whole = [n for n in whole if not vllm_loads_whole(n)]
    if whole:
        found.append(f"whole tensors {whole[:3]} (--extras skip, --embeddings lowrank)")
    lowrank = [i for i in infos if i.status == "lowrank" and i.stats is not None and i.op.experts is None]
    top = max((i.stats.rank for i in lowrank if i.stats is not None), default=0)
    if consumer == "vllm" and top > VLLM_RANKS[-1]:
        found.append(f"rank {top} above vLLM's largest max_lora_rank {VLLM_RANKS[-1]} (--max-rank)")
    if found:
        raise UnsupportedError(f"--for {consumer}: the adapter would hold {'; '.join(found)}")
    for info in lowrank:
        assert info.stats is not None
        k = info.stats.rank
        if k != rank:
            key = saved_key(info.op.module, LAYER_KINDS[info.op.kind].lora_roles[1])
            spool.write(key, (spool.read(key).float() * (k / rank)).to(settings.factor_dtype))
