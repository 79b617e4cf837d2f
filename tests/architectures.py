"""Tiny real architectures, built by transformers from configs: what the architecture matrix runs on.

Each entry gives a config (tiny sizes, deterministic), the model class a user loads it with, and
inputs for a forward pass. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

VOCAB, HIDDEN = 256, 64


@dataclass(frozen=True)
class Arch:
    name: str
    make_config: Callable[[], Any]
    auto: str  # the transformers Auto class a user loads it with
    inputs: Callable[[], dict[str, torch.Tensor]]
    can_tie: bool = True  # whether tie_word_embeddings means anything for it


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 3, 77, 120, 200, 4, 250, 17]])}


def _seq2seq() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 3, 77, 120]]), "decoder_input_ids": torch.tensor([[0, 4, 250, 17]])}


def _pixels() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


def _audio() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_features": torch.randn(1, 16, 60, generator=g), "decoder_input_ids": torch.tensor([[0, 4, 250, 17]])}


def _cfg(cls_name: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, cls_name)(**kwargs)

    return make


_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MOE = dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)

ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", _cfg("LlamaConfig", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch("mistral", _cfg("MistralConfig", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch("qwen2", _cfg("Qwen2Config", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch("qwen3", _cfg("Qwen3Config", **_DECODER, head_dim=16), "AutoModelForCausalLM", _ids),
        Arch("gemma", _cfg("GemmaConfig", **_DECODER, head_dim=16), "AutoModelForCausalLM", _ids),
        Arch("gemma2", _cfg("Gemma2Config", **_DECODER, head_dim=16), "AutoModelForCausalLM", _ids),
        Arch("gemma3", _cfg("Gemma3TextConfig", **_DECODER, head_dim=16), "AutoModelForCausalLM", _ids),
        Arch(
            "phi",
            _cfg(
                "PhiConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch("phi3", _cfg("Phi3Config", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch(
            "gpt2",
            _cfg(
                "GPT2Config",
                vocab_size=VOCAB,
                n_positions=128,
                n_embd=HIDDEN,
                n_layer=2,
                n_head=4,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "gpt_neox",
            _cfg(
                "GPTNeoXConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "gptj",
            _cfg(
                "GPTJConfig",
                vocab_size=VOCAB,
                n_positions=128,
                n_embd=HIDDEN,
                n_layer=2,
                n_head=4,
                rotary_dim=8,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "opt",
            _cfg(
                "OPTConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
                word_embed_proj_dim=HIDDEN,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "bloom",
            _cfg(
                "BloomConfig", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "falcon",
            _cfg(
                "FalconConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch("stablelm", _cfg("StableLmConfig", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch("starcoder2", _cfg("Starcoder2Config", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch("olmo", _cfg("OlmoConfig", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch("olmo2", _cfg("Olmo2Config", **_DECODER), "AutoModelForCausalLM", _ids),
        Arch("mixtral", _cfg("MixtralConfig", **_MOE), "AutoModelForCausalLM", _ids),
        Arch(
            "qwen2_moe",
            _cfg(
                "Qwen2MoeConfig",
                **dict(
                    _DECODER,
                    num_experts=4,
                    num_experts_per_tok=2,
                    moe_intermediate_size=32,
                    shared_expert_intermediate_size=64,
                ),
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "qwen3_moe",
            _cfg(
                "Qwen3MoeConfig",
                **dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "gpt_oss",  # experts stored (E, in, out), fused on disk; gate_up square here (H == 2I)
            _cfg(
                "GptOssConfig",
                **dict(_MOE, intermediate_size=32, head_dim=16),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            "AutoModelForCausalLM",
            _ids,
        ),
        Arch(
            "bert",
            _cfg(
                "BertConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=128,
            ),
            "AutoModelForMaskedLM",
            _ids,
        ),
        Arch(
            "t5",
            _cfg(
                "T5Config",
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
            ),
            "AutoModelForSeq2SeqLM",
            _seq2seq,
        ),
        Arch(
            "vit",
            _cfg(
                "ViTConfig",
                image_size=32,
                patch_size=8,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                num_labels=5,
            ),
            "AutoModelForImageClassification",
            _pixels,
            can_tie=False,
        ),
        Arch(
            "whisper",
            _cfg(
                "WhisperConfig",
                vocab_size=VOCAB,
                num_mel_bins=16,
                d_model=HIDDEN,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                max_source_positions=30,
                max_target_positions=64,
                decoder_start_token_id=0,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "AutoModelForSpeechSeq2Seq",
            _audio,
        ),
        Arch(
            "clip_text",
            _cfg(
                "CLIPTextConfig",
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            ),
            "CLIPTextModel",
            _ids,
            can_tie=False,
        ),
    ]
}


def build(arch: Arch, *, tied: bool | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly initialised model of ``arch`` (tied or untied where that means something), with
    informative norms and biases."""
    import transformers

    config = arch.make_config()
    if tied is not None and arch.can_tie:
        config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    cls = getattr(transformers, arch.auto)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


@torch.no_grad()
def outputs(model: Any, arch: Arch) -> torch.Tensor:
    out = model(**arch.inputs())
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
