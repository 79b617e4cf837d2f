"""The row-block merge kernel (ops.lora.add_lora_rowwise) against hand-computed and float64 results."""

from __future__ import annotations

import pytest
import torch

from lorasurgeon.ops.lora import LAYER_KINDS, add_lora, add_lora_rowwise


def test_hand_computed():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    a = torch.tensor([[1.0, -1.0]])  # r=1, in=2
    b = torch.tensor([[2.0], [0.0], [-1.0]])  # out=3, r=1
    out = torch.empty(3, 2)
    assert add_lora_rowwise(w, [(*LAYER_KINDS["linear"].factors(a, b), 0.5)], out, block=2)  # one row per block
    assert torch.equal(out, torch.tensor([[2.0, 1.0], [3.0, 4.0], [4.5, 6.5]]))


def operands(kind, rows, cols, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    if kind == "linear":
        a, b = torch.randn(r, cols, generator=g), torch.randn(rows, r, generator=g)
    else:  # conv1d / embedding: W is stored transposed relative to B@A
        a, b = torch.randn(r, rows, generator=g), torch.randn(cols, r, generator=g)
    return w, [(a * 0.1, b * 0.1, 0.75), (a * 0.05, b * 0.2, -2.0)]


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("rows,cols,block", [(37, 19, 64), (300, 64, 1 << 18), (5, 1000, 10)])
def test_matches_float64_in_float32(kind, rows, cols, block):
    w, terms = operands(kind, rows, cols, 8, torch.float32)
    exact = w.double()
    for a, b, s in terms:
        left, right = LAYER_KINDS[kind].factors(a, b)
        exact = exact + s * (left.double() @ right.double())
    out = torch.empty(rows, cols)
    assert add_lora_rowwise(w, [(*LAYER_KINDS[kind].factors(a, b), s) for a, b, s in terms], out, block=block)
    torch.testing.assert_close(out.double(), exact, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_bf16_is_rounded_once_and_matches_the_whole_matrix_path(kind):
    w, terms = operands(kind, 512, 384, 16, torch.bfloat16, seed=1)
    whole = w.float()
    for a, b, s in terms:
        whole = add_lora(whole, a, b, s, LAYER_KINDS[kind], inplace=True)
    out = torch.empty_like(w)
    add_lora_rowwise(w, [(*LAYER_KINDS[kind].factors(a, b), s) for a, b, s in terms], out, block=4096)
    # Both round an fp32 sum once; fp32 sums formed in another order may differ in their last
    # bit, which moves a bf16 result only when it sits on a rounding boundary: rare, one unit.
    differ = out != whole.to(torch.bfloat16)
    assert differ.float().mean() < 1e-3
    spacing = torch.exp2(torch.floor(torch.log2(whole.abs().clamp_min(2.0**-126))) - 7)
    assert ((out.float() - whole).abs() <= spacing).all()


def test_result_may_overwrite_the_input():
    w, terms = operands("linear", 200, 96, 4, torch.bfloat16)
    f = [(*LAYER_KINDS["linear"].factors(a, b), s) for a, b, s in terms]
    separate = torch.empty_like(w)
    add_lora_rowwise(w, f, separate, block=500)
    inplace = w.clone()
    add_lora_rowwise(inplace, f, inplace, block=500)
    assert torch.equal(inplace, separate) and not torch.equal(inplace, w)


@pytest.mark.parametrize("where", ["weight_nan", "factor_inf", "float16_overflow"])
def test_reports_nonfinite_results(where):
    w, terms = operands("linear", 64, 32, 4, torch.float32)
    out_dtype = torch.float32
    if where == "weight_nan":
        w[40, 3] = float("nan")
    elif where == "factor_inf":
        terms[0][0][1, 7] = float("inf")
    else:  # finite in float32, too large for float16
        w[2, 2], out_dtype = 70000.0, torch.float16
    out = torch.empty(64, 32, dtype=out_dtype)
    assert not add_lora_rowwise(w, [(*LAYER_KINDS["linear"].factors(a, b), s) for a, b, s in terms], out, block=256)
    assert not torch.isfinite(out).all()


def test_bfloat16_overflow_when_rounding_is_reported():
    # 3.3998e38 is a finite float32 that rounds to +Inf in bfloat16.
    w = torch.zeros(4, 4)
    w[1, 1] = 3.3998e38
    out = torch.empty(4, 4, dtype=torch.bfloat16)
    assert not add_lora_rowwise(w, [], out)
    assert torch.isinf(out[1, 1])
