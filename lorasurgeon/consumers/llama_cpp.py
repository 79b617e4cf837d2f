"""llama.cpp's LoRA adapters (docs/formats.md §8): its rules for ``check --for llama.cpp``, what
``--for llama.cpp`` makes (one alpha, each module's scale folded into its B, no whole tensors), and what
``convert --to gguf`` can write for it (the architectures done here, and what its converter cannot take).

llama.cpp multiplies every pair by alpha / (its B's rank) with one alpha for the file, and its converter
(convert_lora_to_gguf.py) aborts on whole tensors (modules_to_save, llama.cpp#11554).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..adapter.names import ROLE_MAGNITUDE
from ..errors import UnsupportedError
from ..words import article
from .base import Consumer, Findings, Problem

if TYPE_CHECKING:
    from ..adapter.weights import LoraAdapter

# HF architecture -> (gguf MODEL_ARCH name, whether q/k rows are permuted as convert_hf_to_gguf's LlamaModel does)
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "MixtralForCausalLM": ("LLAMA", True),  # LlamaModel: permuted q/k, experts stacked
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen2MoeForCausalLM": ("QWEN2MOE", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
    "Qwen3MoeForCausalLM": ("QWEN3MOE", False),
    "GemmaForCausalLM": ("GEMMA", False),  # its converter changes norms only, and drops lm_head (tied)
    "Gemma2ForCausalLM": ("GEMMA2", False),
    "Gemma3ForCausalLM": ("GEMMA3", False),  # norms shifted, the embedding cut to the tokenizer's vocabulary
    "PhiForCausalLM": ("PHI2", False),
    "Phi3ForCausalLM": ("PHI3", False),  # fused qkv_proj / gate_up_proj kept fused (attn_qkv / ffn_up)
    "GPT2LMHeadModel": ("GPT2", False),  # Conv1D weights transposed to (out, in): PEFT's B·A already is
    "StableLmForCausalLM": ("STABLELM", False),  # its converter stacks per-head q/k norms only
    "Starcoder2ForCausalLM": ("STARCODER2", False),
    "OlmoForCausalLM": ("OLMO", True),  # OlmoModel: LlamaModel's permutation
    "Olmo2ForCausalLM": ("OLMO2", False),
}
NO_HEAD = ("GemmaForCausalLM", "Gemma2ForCausalLM")  # llama.cpp has no output tensor for these
# converters that cut the embedding's rows to the tokenizer's vocabulary (Gemma3Model.modify_tensors): an
# embedding LoRA's A would have to be cut alike, from a tokenizer this command does not read
TRIMMED_VOCABULARY = ("Gemma3ForCausalLM",)


class LlamaCpp(Consumer):
    name = "llama.cpp"
    label = name
    reads = "llama.cpp loads GGUF (`lorasurgeon convert ADAPTER --to gguf --base BASE -o ADAPTER.gguf` makes it)"

    formats = ("peft", "gguf")  # PEFT's through its converter (convert_lora_to_gguf.py), its own GGUF as it is

    def check(self, adapter: LoraAdapter) -> Findings:
        own = adapter.format == "gguf"  # its own file: the converter's rules are past
        found = self.common(adapter) + (self._loaded(adapter) if own else self._converted(adapter))
        return Findings(found + self._notes(adapter))

    def _loaded(self, adapter: LoraAdapter) -> list[Problem]:
        """A .gguf adapter read against the base (adapter.formats.gguf) passed llama-adapter.cpp's own checks."""
        return [
            Problem(
                "gguf",
                "note",
                f"llama.cpp's own format: general.type adapter, adapter.type lora, adapter.lora.alpha, "
                f"{len(adapter.modules)} .lora_a/.lora_b pairs of matching ranks, each fitting the base's weight, "
                "as llama.cpp's loader requires; it scales each pair by alpha / rank, as read here",
            )
        ]

    def _converted(self, adapter: LoraAdapter) -> list[Problem]:
        """What convert_lora_to_gguf.py and llama.cpp's one alpha make of a PEFT adapter."""
        cfg, found = adapter.config, []
        full = [k for k in adapter.replacements]
        if full:
            found.append(
                Problem(
                    "full_tensors",
                    "error",
                    f"whole tensors ({', '.join(full[:3])}): convert_lora_to_gguf aborts on modules_to_save "
                    "(llama.cpp#11554)",
                )
            )
        scales = {m.name: m.scale * m.rank for m in adapter.modules.values()}  # = the alpha each module needs
        if cfg.use_rslora or cfg.alpha_pattern or len({round(v, 9) for v in scales.values()}) > 1:
            what = "use_rslora" if cfg.use_rslora else "per-module alphas"
            found.append(
                Problem(
                    "alpha",
                    "fix",
                    f"{what}: llama.cpp scales every tensor by one alpha / its rank, so these modules would be scaled "
                    "differently from PEFT",
                    f"lorasurgeon convert {adapter.path} --for {self.name} -o OUT (every component kept, each scale "
                    "folded into its B)",
                )
            )
        return found

    def _notes(self, adapter: LoraAdapter) -> list[Problem]:
        """What loads, with a condition to know: LoRA on the output head, 3-D expert LoRA."""
        found = []
        if any(m.name.split(".")[-1] in ("lm_head", "embed_out") for m in adapter.modules.values()):
            found.append(
                Problem("lm_head", "note", "LoRA on the output head fails on models with tied embeddings (#9065)")
            )
        if adapter.config.target_parameters:
            found.append(
                Problem("target_parameters", "note", "3-D expert LoRA: check that the converter maps the experts")
            )
        return found

    def gguf_architecture(self, config: Mapping[str, Any]) -> tuple[str, str, bool]:
        """The base's HF architecture, its gguf MODEL_ARCH name and whether its q/k rows are permuted.

        Raises:
            UnsupportedError: an architecture not done here.
        """
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise UnsupportedError(
                f"{arch}: GGUF adapters are written for {', '.join(ARCHITECTURES)} (llama.cpp's names and layouts "
                "are per architecture)"
            )
        return (arch, *ARCHITECTURES[arch])

    def gguf_refusals(self, adapter: LoraAdapter, config: Mapping[str, Any], arch: str) -> list[str]:
        """What a GGUF adapter for this base cannot hold, by name (empty: it can be written)."""
        from ..names.builtin import is_tied  # here: check --for llama.cpp has no base and need not import names

        found = []
        if adapter.tuned:
            found.append(
                f"{article(adapter.config.peft_type)} adapter (LoRA only: "
                "`lorasurgeon convert ADAPTER --to lora --base BASE --rank N` first)"
            )
        if adapter.config.use_dora or any(ROLE_MAGNITUDE in m.keys for m in adapter.modules.values()):
            found.append("DoRA")
        if adapter.config.bias != "none" or adapter.config.lora_bias:
            found.append("trained biases")
        if adapter.replacements:
            found.append(f"whole tensors ({', '.join(sorted(adapter.replacements)[:3])}; llama.cpp#11554)")
        if adapter.token_deltas:
            found.append("trainable tokens")
        if adapter.config.target_parameters:
            found.append("target_parameters (stacked experts)")
        experts = sorted(m.name for m in adapter.modules.values() if ".experts." in m.name)
        if experts and not adapter.config.target_parameters:
            found.append(f"per-expert LoRAs ({experts[0]}, ...; llama.cpp stacks the experts into one tensor)")
        tied = is_tied(config) or arch in NO_HEAD
        if tied and any(m.name.endswith("lm_head") for m in adapter.modules.values()):
            found.append("LoRA on lm_head of a model whose head is its embedding (llama.cpp#9065)")
        if arch in TRIMMED_VOCABULARY and any(m.kind == "embedding" for m in adapter.modules.values()):
            found.append(f"a LoRA on the embedding of {arch} (llama.cpp cuts its rows to the tokenizer's vocabulary)")
        return found


LLAMA_CPP = LlamaCpp()
