"""Quantized copies of a bf16 checkpoint, written the way each format's producer writes them.

Where the producing library runs on CPU it does the quantizing: compressed-tensors (calculate_qparams,
quantize, pack_to_int32), bitsandbytes (quantize_4bit, int8_vectorwise_quant), transformers
(Fp8Quantize for whole tiles). Partial FP8 tiles, UE8M0 scales and g_idx, which the installed
libraries do not write, come from the small references below, each checked against the library's
dequantizer in test_quantized.py. ``dequantize_with_library`` is the oracle: every quantized weight
of a folder decoded by its producer's own code.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR


# --- block FP8 -----------------------------------------------------------------------------------------
def fp8_reference(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """DeepSeek's rule with partial tiles zero-padded: S = amax/448 per tile, q = e4m3(clamp(W/S))."""
    bm, bn = block
    rows, cols = w.shape
    rt, ct = -(-rows // bm), -(-cols // bn)
    pad = torch.nn.functional.pad(w.float(), (0, ct * bn - cols, 0, rt * bm - rows))
    tiles = pad.reshape(rt, bm, ct, bn)
    amax = tiles.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    if scale_dtype == torch.uint8 or scale_dtype == getattr(torch, "float8_e8m0fnu", None):
        s = torch.exp2(torch.ceil(torch.log2(s)))
    elif scale_dtype != torch.float32:
        stored = s.to(scale_dtype)
        s = torch.where(stored.float() < s, torch.nextafter(stored, torch.tensor(1e9, dtype=scale_dtype)), stored)
        s = s.float()
    q = (tiles / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = q.reshape(rt * bm, ct * bn)[:rows, :cols].contiguous()
    if scale_dtype == torch.uint8:
        stored_s = (torch.log2(s) + 127).to(torch.uint8)
    else:
        stored_s = s.to(scale_dtype)
    return {"weight": q, "weight_scale_inv": stored_s}


def fp8_transformers(w: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """transformers' own FP8 quantizer (whole tiles only)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    hq = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block))
    out = Fp8Quantize(hq)._quantize_one("x.weight", w)
    return {"weight": out["x.weight"], "weight_scale_inv": out["x.weight_scale_inv"]}


# --- compressed-tensors ----------------------------------------------------------------------------------
CT_SCHEMES = {
    "w4a16-asym-group": (
        {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16},
        "pack-quantized",
    ),
    "w4a16-group": (
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        "pack-quantized",
    ),
    "w8a8-int-channel": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "int-quantized"),
    "w8a16-channel": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "pack-quantized"),
    "w8-naive-tensor": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"}, "naive-quantized"),
    "fp8-tensor": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}, "float-quantized"),
    "fp8-channel": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "float-quantized"),
    "fp8-block": (
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "block_structure": [32, 32]},
        "float-quantized",
    ),
}


def _ct_minmax(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.float()
    if args.strategy == "tensor":
        return x.amin().reshape(1), x.amax().reshape(1)
    if args.strategy == "channel":
        return x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    if args.strategy == "group":
        g = x.reshape(x.shape[0], -1, args.group_size)
        return g.amin(-1), g.amax(-1)
    bh, bw = args.block_structure
    t = x.reshape(x.shape[0] // bh, bh, x.shape[1] // bw, bw).transpose(1, 2)
    return t.amin((-1, -2)), t.amax((-1, -2))


def ct_quantize(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """One weight as llm-compressor stores it, by compressed-tensors' own functions."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    spec, fmt = CT_SCHEMES[scheme]
    args = QuantizationArgs(**spec)
    scale, zp = calculate_qparams(*_ct_minmax(w, args), args)
    scale = scale.to(w.dtype)
    zp = None if args.symmetric else zp.round().to(torch.int8)
    q = quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn if args.type == "float" else torch.int8)
    out = {"weight_scale": scale}
    if fmt == "pack-quantized":
        out |= {
            "weight_packed": pack_to_int32(q, args.num_bits),
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int32),
        }
        if zp is not None:
            out["weight_zero_point"] = pack_to_int32(zp, args.num_bits, packed_dim=0)
    else:
        out["weight"] = q
        if zp is not None:
            out["weight_zero_point"] = zp
    return out


def ct_config(scheme: str) -> dict:
    spec, fmt = CT_SCHEMES[scheme]
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": spec, "input_activations": None}},
        "ignore": ["lm_head"],
    }


# --- bitsandbytes ------------------------------------------------------------------------------------------
def bnb_4bit(w: torch.Tensor, quant_type: str, nested: bool) -> dict[str, torch.Tensor]:
    """One weight as transformers saves a Linear4bit: the codes + QuantState.as_dict(packed=True)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    return {"weight": packed} | {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}


def bnb_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as F

    q, scb, _ = F.int8_vectorwise_quant(w.half())
    return {"weight": q, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}


# --- whole folders ------------------------------------------------------------------------------------------
FORMATS = {
    # name: (quantize one linear weight, quantization_config)
    "fp8": (
        lambda w: fp8_transformers(w, (32, 32)),
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
    ),
    "fp8-partial-bf16": (
        lambda w: fp8_reference(w, (48, 40), torch.bfloat16),
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [48, 40]},
    ),
    "fp8-f16": (
        lambda w: fp8_reference(w, (32, 32), torch.float16),
        {"quant_method": "fp8", "weight_block_size": [32, 32]},
    ),
    "fp8-ue8m0": (
        lambda w: fp8_reference(w, (32, 32), torch.float8_e8m0fnu),
        {"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"},
    ),
    "fp8-ue8m0-u8": (
        lambda w: fp8_reference(w, (32, 32), torch.uint8),
        {"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"},
    ),
    **{f"ct-{s}": (lambda w, s=s: ct_quantize(w, s), ct_config(s)) for s in CT_SCHEMES},
    "bnb-nf4": (
        lambda w: bnb_4bit(w, "nf4", False),
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    ),
    "bnb-nf4-dq": (
        lambda w: bnb_4bit(w, "nf4", True),
        {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
        },
    ),
    "bnb-fp4": (
        lambda w: bnb_4bit(w, "fp4", False),
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    ),
    "bnb-int8": (bnb_int8, {"quant_method": "bitsandbytes", "load_in_8bit": True}),
}


def quantized_folder(src: Path, dst: Path, fmt: str) -> Path:
    """A copy of the bf16 checkpoint ``src`` with every linear layer's weight quantized as ``fmt``."""
    make, qconfig = FORMATS[fmt]
    out = Path(shutil.copytree(src, dst))
    tensors = load_file(out / "model.safetensors")
    stored: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if is_linear(name):
            module = name.removesuffix(".weight")
            stored |= {f"{module}.{k}": v.contiguous() for k, v in make(t).items()}
        else:
            stored[name] = t
    (out / "model.safetensors").unlink()
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def dequantize_with_library(folder: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Every linear weight of a quantized folder, decoded by its producer's own code, in float32 (for
    compressed-tensors, whose dequantize computes in the scale's dtype, with the scale given in float32)."""
    t = load_file(Path(folder) / "model.safetensors")
    modules = set()
    for key in t:
        parts = key.split(".")
        modules |= {".".join(parts[: i + 1]) for i, p in enumerate(parts) if p in LINEAR}
    return {f"{m}.weight": _library_one(t, m, fmt) for m in sorted(modules)}


def _library_one(t: dict[str, torch.Tensor], m: str, fmt: str) -> torch.Tensor:
    if fmt.startswith("fp8"):
        from transformers import FineGrainedFP8Config
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        q, s = t[f"{m}.weight"], t[f"{m}.weight_scale_inv"]
        block = FORMATS[fmt][1]["weight_block_size"]
        if q.shape[0] % block[0] or q.shape[1] % block[1]:  # transformers refuses partial tiles: pad them
            rows, cols = q.shape
            padded = torch.nn.functional.pad(
                q.float(), (0, s.shape[1] * block[1] - cols, 0, s.shape[0] * block[0] - rows)
            )
            q = padded.to(torch.float8_e4m3fn)
        hq = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block))
        w = Fp8Dequantize(hq)._dequantize_one(q, s, output_dtype=torch.float32)
        return w[: t[f"{m}.weight"].shape[0], : t[f"{m}.weight"].shape[1]].contiguous()
    if fmt.startswith("ct-"):
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        spec, form = CT_SCHEMES[fmt.removeprefix("ct-")]
        args = QuantizationArgs(**spec)
        scale = t[f"{m}.weight_scale"]
        zp = t.get(f"{m}.weight_zero_point")
        if form == "pack-quantized":
            shape = torch.Size(t[f"{m}.weight_shape"].tolist())
            q = unpack_from_int32(t[f"{m}.weight_packed"], args.num_bits, shape)
            if zp is not None:
                zp = unpack_from_int32(zp, args.num_bits, torch.Size([shape[0], scale.shape[1]]), packed_dim=0)
        else:
            q = t[f"{m}.weight"]
        # its arithmetic runs in the scale's dtype: given the scale in float32 it is exact, (q − zp) · scale
        return dequantize(q, scale.float(), zp, args)
    if fmt.startswith("bnb") and fmt != "bnb-int8":
        import bitsandbytes.functional as F

        parts = {k.removeprefix(f"{m}.weight."): v for k, v in t.items() if k.startswith(f"{m}.weight.")}
        state = F.QuantState.from_dict(parts, device="cpu")
        state.dtype = torch.float32  # its arithmetic is float32; keep it unrounded
        return F.dequantize_4bit(t[f"{m}.weight"], state)
    import bitsandbytes.functional as F

    return F.int8_vectorwise_dequant(t[f"{m}.weight"], t[f"{m}.SCB"])
