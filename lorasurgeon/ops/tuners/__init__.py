"""The merge math of PEFT's tuners other than LoRA, exactly as PEFT 0.21.2 computes it. Pure functions of
tensors and of adapter_config.json's dict: no file IO; float32 in, float32 out (rounded once by the caller).

``TUNERS`` maps PEFT's ``peft_type`` lowercased ("loha", "ia3", ...) to a ``Tuner`` (``_base.Tuner``)::

    tuner = TUNERS[raw_config["peft_type"].lower()]
    module, suffix = tuner.split_key(key.removeprefix("base_model.model."))   # None: not this tuner's key
    parts = {suffix: tensor, ...} | {name: file[saved] for name, saved in tuner.shared_parts(module).items()}
    cfg = tuner.module_config(raw_config, module, {k: v.shape for k, v in parts.items()}, layer="linear")
    merged = tuner.merge(w0, parts, cfg)              # also unmerge(w, parts, cfg) and delta(w0, parts, cfg)
    bias = tuner.merge_bias(b0, parts, cfg, w0=w0)    # None: the bias is left as it is

Names. A saved key is ``base_model.model.<module>.<suffix>``, ``suffix`` one of ``tuner.module_suffixes``
(or matching ``tuner.suffix_pattern``), the adapter name removed as ``save_pretrained`` writes it
(``hada_w1_a``, ``oft_R.weight``); ``module`` is the module's path in the base model (PEFT's ``current_key``,
which rank_pattern / alpha_pattern / feedforward_modules ... are matched against). Adapter-wide tensors
(``tuner.shared_keys``: VeRA's ``vera_A`` saved as ``base_model.vera_A``; FRoD's per-role
``base_model.frod_V.self_attn_q_proj``) go into ``parts`` under their short names, as ``shared_parts`` maps
them. A targeted embedding's own weight is saved too (``<module>.base_layer.weight``): it is W0, not a part.
``layer`` is an ``ops.lora.LayerName`` (or "norm") among ``tuner.layers``; "conv1d" (GPT-2's Conv1D, weight
stored (in, out)) sets ``fan_in_fan_out`` as PEFT forces it. ``module_config`` raises UnsupportedError for a
layer kind or a variant the math does not cover, AdapterConfigError for a config PEFT could not have written.

Kinds. ``tuner.additive``: ``merge(w0) = w0 + ΔW`` with ΔW independent of W0's values (LoHa, LoKr, AdaLoRA,
VeRA, PVeRA, FourierFT, WaveFT, DeLoRA, C3A, SHiRA, GraLoRA, RandLoRA, VB-LoRA, UniLoRA, Super-Tuning, BEFT):
``delta`` needs only W0's shape, and is a sum that can be turned into a LoRA. The others depend on W0: they
scale (IA3), rotate (OFT, BOFT, HRA, RoAd), mix blocks (MiSS), Hadamard-multiply (HiRA), derive ΔW from W0
(PEANuT, OSF, DEFT, FRoD, GLoRA) or replace it (LN-Tuning, trainable tokens); ``delta = merge(w0) - w0``.
``bias`` marks the tuners whose merge changes the bias (IA3, RoAd, GLoRA, BEFT, LN-Tuning): GLoRA's needs
W0 (``w0=``). ``unmerge`` is PEFT's own inverse (IA3's divides by ``l + 1e-8`` as PEFT's does); it is None
where PEFT has none or restores a copy of W0 it kept (HiRA, PEANuT, OSF, DEFT, FRoD, LN-Tuning).

Not here (PEFT 0.21.2 types): LoRA (``ops.lora``); nothing to merge (prompt_tuning, multitask_prompt_tuning,
p_tuning, prefix_tuning, adaption_prompt, cpt, cartridge); input-dependent, no merge in PEFT (poly, xlora,
lily); WaveFT with use_idwt (PEFT's default: an inverse wavelet transform); TinyLoRA (module-to-vector groups
from the model's layout); PSOFT (A, B from an SVD of W0 redone at load, sign-dependent); AdaMSS (needs
scikit-learn's clustering at load); UniLoRA / Super-Tuning saved without their indices.
"""

from __future__ import annotations

from ._base import ModuleConfig, Parts, Shapes, Tuner, pattern_key
from .adalora import ADALORA
from .beft import BEFT_TUNER
from .c3a import C3A_TUNER
from .deft import DEFT_TUNER
from .delora import DELORA
from .fourierft import FOURIERFT
from .frod import FROD
from .glora import GLORA
from .gralora import GRALORA
from .hira import HIRA
from .hra import HRA_TUNER
from .ia3 import IA3_TUNER
from .ln_tuning import LN_TUNING
from .lycoris import LOHA, LOKR
from .miss import MISS
from .oft import BOFT_TUNER, OFT_TUNER
from .osf import OSF_TUNER
from .peanut import PEANUT
from .randlora import RANDLORA
from .road import ROAD
from .shira import SHIRA
from .supertuning import SUPERTUNING
from .trainable_tokens import TRAINABLE_TOKENS
from .unilora import UNILORA
from .vblora import VBLORA
from .vera import PVERA, VERA
from .waveft import WAVEFT

TUNERS: dict[str, Tuner] = {
    t.name: t
    for t in (
        LOHA,
        LOKR,
        IA3_TUNER,
        ADALORA,
        VERA,
        OFT_TUNER,
        BOFT_TUNER,
        FOURIERFT,
        HRA_TUNER,
        ROAD,
        MISS,
        DELORA,
        C3A_TUNER,
        SHIRA,
        GRALORA,
        RANDLORA,
        LN_TUNING,
        VBLORA,
        BEFT_TUNER,
        HIRA,
        SUPERTUNING,
        PVERA,
        GLORA,
        PEANUT,
        OSF_TUNER,
        DEFT_TUNER,
        FROD,
        UNILORA,
        TRAINABLE_TOKENS,
        WAVEFT,
    )
}

__all__ = ["TUNERS", "ModuleConfig", "Parts", "Shapes", "Tuner", "pattern_key"]
