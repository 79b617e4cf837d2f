"""The format matrix: adapter format / tuner × command, each cell checked against the adapter's producer.

Kinds: a PEFT LoRA and DoRA (PEFT's merge_and_unload is the truth), an MLX-LM LoRA and DoRA saved as mlx_lm.lora saves
them (mlx-lm's load_adapters + fuse is the truth), a llama.cpp GGUF LoRA written by ``convert --to gguf`` from a PEFT
LoRA (PEFT's merge of that LoRA is the truth; gguf's own GGUFReader reads the file back), and one PEFT adapter per
tuner of ``lorasurgeon.ops.tuners.TUNERS`` (the cases of tests/test_tuners_math.py, every parameter moved off PEFT's
no-op init; merge_and_unload is the truth).

Commands, each run through the CLI on float32 files; a cell is the largest absolute error against the truth, or a
refusal that must be one ``error:`` line holding the phrases of expected_refusal:

- merge:   ``merge BASE ADAPTER --dtype float32`` against the producer's merged weights;
- unmerge: ``unmerge`` of the producer's merged model, against the base;
- peft / mlx / gguf: ``convert --to FORMAT`` (with ``--base`` where the format needs it), the result read by its
  own consumer: ``merge`` of a PEFT folder, mlx-lm's load_adapters + fuse of an MLX one, gguf's GGUFReader (the
  pairs computed as llama.cpp computes them) of a .gguf one; against the truth;
- lora:    ``convert --to lora --base BASE --rank 4096`` (each module at full rank), merged: the whole change;
- extract: ``extract BASE ORACLE --rank 4096`` of the producer's merged model, merged back: the change at full rank;
- resize:  ``resize ADAPTER --rank R`` at the adapter's own rank (nothing to drop), merged;
- combine: ``combine ADAPTER ADAPTER --weight 0.5 --weight 0.5`` (the same change), merged.

The default run takes a representative subset (FAST: every command and every format at least once); ``pytest -m
slow`` runs every cell. benchmarks/bench_formats.py prints the README's table from the same cells.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_line_error, run_cli
from reference import read_folder
from safetensors.torch import save_file

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from lorasurgeon.ops.tuners import TUNERS  # noqa: E402

LORA_KINDS = ["peft-lora", "peft-dora", "mlx-lora", "mlx-dora", "gguf-lora"]
KINDS = LORA_KINDS + sorted(TUNERS)
COMMANDS = ["merge", "unmerge", "peft", "mlx", "gguf", "lora", "extract", "resize", "combine"]
RANK = 4  # the LoRA kinds' rank
FULL = 4096  # --rank at or above every matrix's smaller side: full rank
TOL = {  # float32: sums in another order; a full-rank SVD in float32 reproduces the change to ~1e-6 per element
    "merge": 1e-5,
    "unmerge": 1e-5,
    "peft": 1e-5,
    "mlx": 1e-5,
    "gguf": 1e-5,
    "lora": 1e-4,
    "extract": 1e-4,
    "resize": 1e-5,
    "combine": 1e-5,
}

# What is refused, and the phrases its one line must hold (expected_refusal below puts in each tuner's name).
DORA = {
    "unmerge": ("DoRA cannot be unmerged from the merged weights alone", "keep the base model"),
    "gguf": ("llama.cpp cannot take DoRA",),
    "resize": ("cannot be resized as low-rank factors", "DoRA"),
    "combine": ("cannot be combined as low-rank factors", "DoRA"),
}
GGUF_TO_GGUF = ("is a llama.cpp GGUF adapter already",)
TUNER_REFUSED = {  # every tuner: not LoRA factors, and the way out named
    "mlx": ("mlx's format holds LoRA (and DoRA) only", "--to lora --base BASE"),
    "gguf": ("llama.cpp cannot take a", "--to lora"),
    "resize": ("cannot be resized as low-rank factors", "--to lora"),
    "combine": ("cannot be combined as low-rank factors", "--to lora"),
}
NOT_INVERTIBLE = ("cannot be unmerged from the merged weights alone",)  # PEFT keeps W0, or has no unmerge


def expected_refusal(kind: str, command: str) -> tuple[str, ...] | None:
    """The phrases of the one-line refusal of this cell; None where it must be measured."""
    if kind in ("peft-dora", "mlx-dora"):
        return DORA.get(command)
    if kind == "gguf-lora":
        return GGUF_TO_GGUF if command == "gguf" else None
    if kind in TUNERS:
        name = kind.upper()
        if command == "unmerge":
            return None if TUNERS[kind].invertible else (*NOT_INVERTIBLE, name)
        return (*TUNER_REFUSED[command], name) if command in TUNER_REFUSED else None
    return None


@dataclass
class Made:
    """One adapter of a kind, written in ``root``: the base, the adapter, the producer's merged model."""

    kind: str
    root: Path
    base: Path
    adapter: Path  # what a command is given (a folder, or a .gguf file)
    oracle: Path  # the producer's merged model, saved as a folder of the base's layout
    expected: dict[str, torch.Tensor]  # its tensors (float32)
    fmt: str  # "peft", "mlx" or "gguf"
    needs_base: bool  # a .gguf adapter: read against --base


@dataclass
class Refused:
    line: str  # the CLI's one line, "error: ..."

    def short(self) -> str:
        return self.line.removeprefix("error: ")


Cell = float | Refused


# ---------------------------------------------------------------------------------------------- the adapters


def _lora_base(root: Path) -> tuple[Any, Path]:
    """A tiny Llama without biases (mlx-lm's Llama loads it strictly), saved; returns (a fresh copy, its folder)."""
    import make_fixtures as mf

    config = mf.llama_config(layers=1, hidden=32, vocab=64)
    base = mf.save_model(mf.build_model(config, seed=0), root / "base")
    return mf.build_model(config, seed=0), base


def _save_oracle(root: Path, base: Path, expected: dict[str, torch.Tensor]) -> Path:
    """The producer's merged weights as a model folder of the base's keys and config."""
    oracle = root / "oracle"
    oracle.mkdir()
    keys = read_folder(base)
    save_file({k: expected[k].contiguous() for k in keys}, oracle / "model.safetensors", metadata={"format": "pt"})
    (oracle / "config.json").write_text((base / "config.json").read_text())
    return oracle


def _peft_lora(root: Path, *, dora: bool) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """PEFT's LoRA (or DoRA, its magnitudes moved off ||W0||) of every Linear of the tiny Llama."""
    model, base = _lora_base(root)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=dora)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    wrapped.save_pretrained(root / "adapter")
    expected = {k: v.detach().float().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return base, root / "adapter", expected


def _mlx(root: Path, *, dora: bool) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """An adapter as mlx_lm.lora saves one (tests/test_mlx_adapter.py's mlx_trained); the truth: mlx-lm's fuse."""
    from mlx_lm.tuner.utils import load_adapters
    from test_mlx_adapter import mlx_fused, mlx_model, mlx_trained

    _, base = _lora_base(root)
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
    adapter = mlx_trained(base, root / "adapter", kind="dora" if dora else "lora", num_layers=1, keys=keys)
    model = mlx_model(base)
    load_adapters(model, str(adapter))
    return base, adapter, read_folder(base) | mlx_fused(model)


def _tuner_case(tuner: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The first case of tests/test_tuners_math.py for this tuner ("waveft" is "waveft-sparse")."""
    from test_tuners_math import cases

    all_cases = cases()
    name = tuner if tuner in all_cases else next(n for n in all_cases if n.startswith(f"{tuner}-"))
    return all_cases[name]


def _peft_tuner(root: Path, tuner: str) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    from test_tuners_math import perturb

    make, config = _tuner_case(tuner)
    model = make()
    model.save_pretrained(root / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config())
        perturb(wrapped)
        wrapped.save_pretrained(root / "adapter")
        expected = {k: v.detach().float().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return root / "base", root / "adapter", expected


def make(kind: str, root: Path) -> Made:
    root.mkdir(parents=True, exist_ok=True)
    fmt, needs_base = "peft", False
    if kind in ("peft-lora", "peft-dora"):
        base, adapter, expected = _peft_lora(root, dora=kind == "peft-dora")
    elif kind in ("mlx-lora", "mlx-dora"):
        base, adapter, expected = _mlx(root, dora=kind == "mlx-dora")
        fmt = "mlx"
    elif kind == "gguf-lora":
        base, source, expected = _peft_lora(root / "source", dora=False)
        adapter = root / "adapter.gguf"
        done = run_cli("convert", source, "--to", "gguf", "--base", base, "-o", adapter, "-q")
        assert done.exit_code == 0, done.output
        fmt, needs_base = "gguf", True
    else:
        base, adapter, expected = _peft_tuner(root, kind)
    plain = read_folder(base)
    changed = max((expected[k] - v.float()).abs().max().item() for k, v in plain.items())
    assert changed > 1e-3, f"{kind}: the adapter is a no-op, its cells prove nothing"
    return Made(kind, root, base, adapter, _save_oracle(root, base, expected), expected, fmt, needs_base)


# ---------------------------------------------------------------------------------------------- the commands


def _run(*args: object) -> Refused | None:
    """The CLI; None when it succeeded, else its refusal (checked to be one clear line)."""
    done = run_cli(*args, "-q")
    if done.exit_code == 0:
        return None
    return Refused(one_line_error(done))


def _error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got and set(got) <= set(want), sorted(set(got) - set(want))[:4]
    return max((got[k].float() - want[k].float()).abs().max().item() for k in got)


def _merged_error(m: Made, adapter: Path, name: str, *base_args: object) -> Cell:
    """``merge BASE adapter --dtype float32`` against the truth."""
    out = m.root / name
    refused = _run("merge", m.base, adapter, "--dtype", "float32", "-o", out, *base_args)
    return refused or _error(read_folder(out), m.expected)


def _base_args(m: Made) -> tuple[object, ...]:
    return ("--base", m.base) if m.needs_base else ()


def do_merge(m: Made) -> Cell:
    return _merged_error(m, m.adapter, "merged")


def do_unmerge(m: Made) -> Cell:
    out = m.root / "unmerged"
    refused = _run("unmerge", m.oracle, m.adapter, "--dtype", "float32", "-o", out)
    return refused or _error(read_folder(out), read_folder(m.base))


def do_peft(m: Made) -> Cell:
    out = m.root / "as-peft"
    refused = _run("convert", m.adapter, "--to", "peft", *_base_args(m), "-o", out)
    return refused or _merged_error(m, out, "as-peft-merged")


def do_mlx(m: Made) -> Cell:
    """--to mlx, loaded and fused by mlx-lm on the base (mlx-lm's loader refuses a name or shape it lacks)."""
    out = m.root / "as-mlx"
    refused = _run("convert", m.adapter, "--to", "mlx", *_base_args(m), "-o", out)
    if refused:
        return refused
    from mlx_lm.tuner.utils import load_adapters
    from test_mlx_adapter import mlx_fused, mlx_model

    model = mlx_model(m.base)
    load_adapters(model, str(out))
    fused = mlx_fused(model)
    assert fused, "mlx-lm found nothing to fuse"
    return _error(fused, m.expected)


def gguf_deltas(path: Path, base: Path) -> dict[str, torch.Tensor]:
    """Each pair of a llama.cpp LoRA file read by gguf's GGUFReader, as llama.cpp applies it (alpha / rank of
    its B), its q/k rows put back in HF's order (convert_hf_to_gguf's LlamaModel.permute undone): HF name -> ΔW."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    assert str(bytes(fields["general.type"].parts[-1]), "utf-8") == "adapter"
    assert str(bytes(fields["adapter.type"].parts[-1]), "utf-8") == "lora"
    alpha = float(fields["adapter.lora.alpha"].parts[-1][0])
    config = json.loads((base / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = {t.name: torch.from_numpy(t.data.astype("float32").copy()) for t in reader.tensors}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for hf in read_folder(base):
        stem = hf.removesuffix(".weight")
        mapped = names.get_name(stem)
        if mapped is None or f"{mapped}.weight.lora_a" not in tensors:
            continue
        a, b = tensors.pop(f"{mapped}.weight.lora_a"), tensors.pop(f"{mapped}.weight.lora_b")
        delta = (alpha / b.shape[1] if alpha else 1.0) * (b @ a)
        n = heads.get(mapped.split(".")[-1])
        if n is not None:  # inverse of permute: (n, rows/n/2, 2, in) -> (n, 2, rows/n/2, in)
            delta = delta.reshape(n, delta.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(delta.shape)
        out[hf] = delta
    assert not tensors, f"pairs with no module of the base: {sorted(tensors)[:4]}"
    return out


def do_gguf(m: Made) -> Cell:
    """--to gguf (with --base), read by gguf's GGUFReader: W0 + ΔW per pair against the truth."""
    out = m.root / "as.gguf"
    refused = _run("convert", m.adapter, "--to", "gguf", "--base", m.base, "-o", out)
    if refused:
        return refused
    plain = read_folder(m.base)
    deltas = gguf_deltas(out, m.base)
    assert deltas, "no pair in the file"
    got = {k: plain[k].float() + d for k, d in deltas.items()}
    untouched = {k: v for k, v in plain.items() if k not in deltas}
    return max(_error(got, m.expected), _error(untouched, m.expected))


def do_lora(m: Made) -> Cell:
    out = m.root / "as-lora"
    refused = _run("convert", m.adapter, "--to", "lora", "--base", m.base, "--rank", FULL, "-o", out)
    return refused or _merged_error(m, out, "as-lora-merged")


def do_extract(m: Made) -> Cell:
    out = m.root / "extracted"
    refused = _run("extract", m.base, m.oracle, "--rank", FULL, "-o", out)
    return refused or _merged_error(m, out, "extracted-merged")


def do_resize(m: Made) -> Cell:
    out = m.root / "resized"
    refused = _run("resize", m.adapter, *_base_args(m), "--rank", RANK, "-o", out)
    return refused or _merged_error(m, out, "resized-merged")


def do_combine(m: Made) -> Cell:
    out = m.root / "combined"
    halves = ("--weight", 0.5, "--weight", 0.5)
    refused = _run("combine", m.adapter, m.adapter, *halves, *_base_args(m), "-o", out)
    return refused or _merged_error(m, out, "combined-merged")


DO: dict[str, Callable[[Made], Cell]] = {
    "merge": do_merge,
    "unmerge": do_unmerge,
    "peft": do_peft,
    "mlx": do_mlx,
    "gguf": do_gguf,
    "lora": do_lora,
    "extract": do_extract,
    "resize": do_resize,
    "combine": do_combine,
}


# ---------------------------------------------------------------------------------------------- the matrix

FAST = {
    ("peft-lora", "merge"),
    ("peft-lora", "mlx"),
    ("peft-lora", "gguf"),
    ("peft-lora", "resize"),
    ("peft-dora", "unmerge"),
    ("peft-dora", "gguf"),
    ("mlx-lora", "peft"),
    ("mlx-dora", "merge"),
    ("gguf-lora", "peft"),
    ("gguf-lora", "combine"),
    ("loha", "lora"),
    ("loha", "extract"),
    ("ia3", "unmerge"),
    ("ia3", "mlx"),
    ("peanut", "unmerge"),
    ("oft", "resize"),
}

_MADE: dict[str, Made] = {}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Made]:
    """Each kind's adapter built once per module run (the cells of one kind share it)."""

    def get(kind: str) -> Made:
        if kind not in _MADE:
            _MADE[kind] = make(kind, tmp_path_factory.mktemp(kind))
        return _MADE[kind]

    return get


def _cells() -> list[Any]:
    params = []
    for kind in KINDS:
        for command in COMMANDS:
            marks = [] if (kind, command) in FAST else [pytest.mark.slow]
            params.append(pytest.param(kind, command, id=f"{kind}-{command}", marks=marks))
    return params


@pytest.mark.parametrize("kind,command", _cells())
def test_format_matrix(made: Callable[[str], Made], kind: str, command: str) -> None:
    m = made(kind)
    (m.root / command).mkdir()  # each cell's outputs apart from the others'
    cell = DO[command](Made(**{**m.__dict__, "root": m.root / command}))
    phrases = expected_refusal(kind, command)
    if phrases is None:
        assert not isinstance(cell, Refused), cell.line
        assert cell < TOL[command], cell
    else:
        assert isinstance(cell, Refused), f"expected a refusal holding {phrases}, measured {cell:.1e}"
        for phrase in phrases:
            assert phrase in cell.line, cell.line
