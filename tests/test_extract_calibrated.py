"""extract --calibration: factors and budgets chosen by output error on data (issue 27), on the committed base fully
fine-tuned here on English text. The oracles: the dense closed form of the weighted problem, formed here from
moments gathered by a whole-model forward with hooks; PEFT loading the adapter; next-token KL to the fine-tune on
held-out text."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, byte_tokenizer, one_line_error, run_cli
from reference import input_moments, output_moments, peft_model
from safetensors.torch import load_file

import lorasurgeon as ls
from lorasurgeon.calibration import backward

TRAIN = [
    "The quick brown fox jumps over the lazy dog while the farmer sleeps.",
    "A lorasurgeon merges adapters into base weights, one tensor at a time.",
    "Paris is the capital of France, and its river is called the Seine.",
    "Every low-rank adapter is a product of two thin matrices, B times A.",
]
CALIBRATION = [
    "The farmer wakes up early and feeds the dog before the sun rises.",
    "Weights are merged one tensor at a time, so memory stays small.",
    "Rivers flow through many capitals; the Thames runs through London.",
    "A thin matrix times another thin matrix makes a low-rank product.",
    "Foxes are quick, dogs are lazy, and farmers are always busy.",
    "The adapter holds two matrices per module, and a scale alpha over r.",
]
HELD_OUT = [
    "The lazy dog sleeps while the quick fox runs over the hill.",
    "The capital of Italy is Rome, and its river is the Tiber.",
    "Adapters are merged into the base one tensor at a time.",
]


def ids_of(texts: list[str]) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    return [torch.tensor([AutoTokenizer.from_pretrained(TOKENIZER_HOME["dir"])(t)["input_ids"]]) for t in texts]


TOKENIZER_HOME: dict[str, Path] = {}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """The committed base (untied) trained fully on TRAIN (AdamW, 40 steps), a byte tokenizer beside it."""
    import transformers

    root = tmp_path_factory.mktemp("calibrated")
    TOKENIZER_HOME["dir"] = byte_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(FIX_BASE, dtype=torch.float32)
    batch = torch.nn.utils.rnn.pad_sequence([i[0] for i in ids_of(TRAIN)], batch_first=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "tuned")
    byte_tokenizer(root / "tuned")
    (root / "prompts.txt").write_text("\n\n".join(CALIBRATION) + "\n")
    return root / "tuned"


def prompts(tuned: Path) -> Path:
    return tuned.parent / "prompts.txt"


def whole_model_moments(model_dir: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """E[x xᵀ] of every Linear's inputs, by a whole-model forward with hooks (float64)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return input_moments(model, ids_of(texts))


def _roots(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric root of G + λI and its inverse (λ = 1e-4 · mean diag G; G a vector: a diagonal)."""
    full = torch.diag(g) if g.ndim == 1 else g
    lam = 1e-4 * float(torch.diagonal(full).mean())
    w, q = torch.linalg.eigh(full + lam * torch.eye(full.shape[0], dtype=torch.float64))
    return q @ torch.diag(w.sqrt()) @ q.T, q @ torch.diag(w.rsqrt()) @ q.T


def closed_form(delta: torch.Tensor, g: torch.Tensor, rank: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sr⁻¹·[Sr·ΔW·Sc]_k·Sc⁻¹: the rank-k minimiser of ‖Sr·(ΔW − X)·Sc‖, Sc and Sr the symmetric roots of the
    inputs' moment G and the output weight (identity without ``rows``)."""
    root, inv = _roots(g)
    left, left_inv = _roots(rows) if rows is not None else (torch.eye(delta.shape[0], dtype=torch.float64),) * 2
    u, s, vh = torch.linalg.svd(left @ delta @ root)
    return left_inv @ u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] @ inv


def test_the_calibrated_factors_are_the_closed_form_optimum_on_moments_gathered_whole(tuned, tmp_path):
    """Each module's factors minimise its error weighed by its inputs' moment and its output gradients' (the
    Fisher's K-FAC factors), both gathered here by the model run whole with hooks and autograd."""
    import transformers

    out = tmp_path / "cal"
    report = ls.extract(FIX_BASE, tuned, out, rank=3, solver="exact", calibration=prompts(tuned), extras="skip")
    factors = load_file(out / "adapter_model.safetensors")
    moments = whole_model_moments(tuned, CALIBRATION)
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
    outputs, embedding, head = output_moments(model, ids_of(CALIBRATION), backward.SEED)
    base, fine = load_file(FIX_BASE / "model.safetensors"), load_file(tuned / "model.safetensors")
    checked = 0
    for module in report.modules:
        key = f"base_model.model.{module.name}"
        delta = fine[f"{module.name}.weight"].double() - base[f"{module.name}.weight"].double()
        if module.kind == "embedding":
            counts = torch.bincount(torch.cat([i[0] for i in ids_of(CALIBRATION)]), minlength=delta.shape[0])
            want = closed_form(delta.T, counts.double() / counts.sum(), 3, embedding)
            got = factors[f"{key}.lora_embedding_B"].double() @ factors[f"{key}.lora_embedding_A"].double()
        else:
            rows = outputs.get(module.name, head)  # the head's: its logits' Fisher diagonal
            want = closed_form(delta, moments[module.name], 3, rows)
            got = factors[f"{key}.lora_B.weight"].double() @ factors[f"{key}.lora_A.weight"].double()
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5, module.name
        assert module.output is not None and module.output.after <= module.output.plain_svd * (1 + 1e-6)
        checked += 1
    assert checked == 2 * 7 + 2  # every linear of both layers, the embedding and the head
    doc = json.loads((out / "extract_report.json").read_text())
    assert doc["method"]["calibration"]["activations"] == "finetuned"
    assert doc["method"]["calibration"]["weight"] == "inputs and output gradients (K-FAC Fisher)"
    assert set(doc["modules"][0]["output"]) == {"before", "after", "plain_svd"}
    assert any("activations and output gradients, measured layer by layer" in n for n in doc["notes"])


def test_without_the_backward_the_factors_are_the_input_whitened_optimum(tuned, tmp_path):
    """Calibration(fisher=False): each module's error weighed by its inputs' moment alone (no backward run), as the
    method says."""
    from lorasurgeon.calibration import Calibration
    from lorasurgeon.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="fisher"):
        Calibration(str(prompts(tuned)), fisher="no")  # type: ignore[arg-type]

    out = tmp_path / "inputs"
    calibration = Calibration(str(prompts(tuned)), fisher=False)
    report = ls.extract(FIX_BASE, tuned, out, rank=3, solver="exact", calibration=calibration, extras="skip")
    factors = load_file(out / "adapter_model.safetensors")
    moments = whole_model_moments(tuned, CALIBRATION)
    base, fine = load_file(FIX_BASE / "model.safetensors"), load_file(tuned / "model.safetensors")
    linear = [m for m in report.modules if m.kind == "linear"]
    for module in linear:
        key = f"base_model.model.{module.name}"
        delta = fine[f"{module.name}.weight"].double() - base[f"{module.name}.weight"].double()
        want = closed_form(delta, moments[module.name], 3)
        got = factors[f"{key}.lora_B.weight"].double() @ factors[f"{key}.lora_A.weight"].double()
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5, module.name
    assert len(linear) == 2 * 7 + 1
    doc = json.loads((out / "extract_report.json").read_text())
    assert doc["method"]["calibration"]["weight"] == "inputs"
    assert not any("output gradients" in n for n in doc["notes"])


def kl_to_tuned(adapter: Path, tuned: Path) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
    peft, _ = peft_model(FIX_BASE, [adapter], dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        for x in ids_of(HELD_OUT):
            want = model(input_ids=x).logits.log_softmax(-1)
            got = peft(input_ids=x).logits.log_softmax(-1)
            total += float((want.exp() * (want - got)).sum(-1).mean())
    return total / len(HELD_OUT)


def test_at_equal_size_the_calibrated_budget_has_lower_kl_on_held_out_text(tuned, tmp_path):
    plain = ls.extract(FIX_BASE, tuned, tmp_path / "plain", budget="48KB", dtype="bfloat16")
    cal = ls.extract(FIX_BASE, tuned, tmp_path / "cal", budget="48KB", dtype="bfloat16", calibration=prompts(tuned))
    size = (tmp_path / "cal" / "adapter_model.safetensors").stat().st_size
    assert size <= 48_000  # the file, header included
    assert plain.totals.parameters >= cal.totals.parameters  # the plain one is not smaller
    assert kl_to_tuned(tmp_path / "cal", tuned) < kl_to_tuned(tmp_path / "plain", tuned)
    assert any("by output error" in n or "--budget" in n for n in cal.notes)


def test_without_calibration_nothing_changes_in_the_report(tuned, tmp_path):
    ls.extract(FIX_BASE, tuned, tmp_path / "plain", rank=2)
    doc = json.loads((tmp_path / "plain" / "extract_report.json").read_text())
    assert "calibration" not in doc["method"] and all("output" not in m for m in doc["modules"])


def test_calibration_mistakes_are_one_line_and_write_nothing(tuned, tmp_path):
    out = tmp_path / "x"
    one_line_error(
        run_cli("extract", FIX_BASE, tuned, "--rank", "2", "--calibration-samples", "4", "-o", out),
        "--calibration-samples",
        "--calibration",
    )
    one_line_error(
        run_cli("extract", FIX_BASE, tuned, "--rank", "2", "--calibration", tmp_path / "nope.txt", "-o", out),
        "nope.txt",
    )
    one_line_error(
        run_cli(
            "extract",
            FIX_BASE,
            tuned,
            "--rank",
            "2",
            "--calibration",
            prompts(tuned),
            "--calibration-samples",
            "0",
            "-o",
            out,
        ),
        "--calibration-samples",
    )
    bare, bare_base = tmp_path / "bare", tmp_path / "bare-base"
    shutil.copytree(tuned, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    shutil.copytree(FIX_BASE, bare_base, ignore=shutil.ignore_patterns("tokenizer*"))
    one_line_error(
        run_cli("extract", bare_base, bare, "--rank", "2", "--calibration", prompts(tuned), "-o", out), "tokenizer"
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_dry_run_reads_the_samples_and_says_how_it_would_calibrate(tuned, tmp_path):
    r = run_cli(
        "extract",
        FIX_BASE,
        tuned,
        "--rank",
        "2",
        "--calibration",
        prompts(tuned),
        "--calibration-model",
        "base",
        "-o",
        tmp_path / "d",
        "--dry-run",
    )
    assert r.exit_code == 0, r.output
    assert "would calibrate on" in r.output and "the base's activations" in r.output
    assert not (tmp_path / "d").exists()


def test_a_tied_head_is_stored_once_and_peft_ties_it_back(tmp_path):
    """A tied model: the head's change is the embedding's. Stored once with ensure_weight_tying, PEFT's forward
    equals lorasurgeon's merge of the same adapter (the tied head merged with its embedding)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(FIX_BASE)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer(tmp_path / "base")
    opt = torch.optim.AdamW(base.parameters(), lr=2e-3)
    batch = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    for _ in range(10):
        base(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    base.save_pretrained(tmp_path / "tuned")
    byte_tokenizer(tmp_path / "tuned")
    (tmp_path / "p.txt").write_text("\n".join(CALIBRATION))
    report = ls.extract(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "a", budget="32KB", calibration=tmp_path / "p.txt"
    )
    assert len({m.rank for m in report.modules}) > 1  # the embedding's rank need not be the config's r
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    config_doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config_doc["ensure_weight_tying"] is True and not any("lm_head" in k for k in keys)
    assert any("ensure_weight_tying" in n for n in report.notes)
    ls.merge(tmp_path / "base", [tmp_path / "a"], tmp_path / "merged", dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft, _ = peft_model(tmp_path / "base", [tmp_path / "a"], dtype=torch.float32)
    x = batch[:2]
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-4)


def merged_model_moments(texts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inputs' moments and the output gradients' of the committed base with the committed adapter merged in
    (PEFT's merge_and_unload), by the model run whole with hooks and autograd."""
    model, _ = peft_model(FIX_BASE, [FIX_ADAPTER], dtype=torch.float32)
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        inputs = input_moments(merged, ids_of(texts))
    return inputs, output_moments(merged, ids_of(texts), backward.SEED)[0]


def test_resize_calibrated_is_the_closed_form_on_the_merged_models_moments(tuned, tmp_path):
    """resize --calibration --base: each module's rank-2 factors of its own s·B·A, best on the inputs the base with
    the adapter merged in sees and weighed by the gradients at its output -- the dense closed form of that weighted
    problem, formed here."""
    report = ls.resize(FIX_ADAPTER, tmp_path / "r2", rank=2, base=FIX_BASE, calibration=prompts(tuned))
    moments, outputs = merged_model_moments(CALIBRATION)
    before = load_file(FIX_ADAPTER / "adapter_model.safetensors")
    after = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    scale_in = 16 / 8
    for module in report.modules:
        key = f"base_model.model.{module.name}"
        delta = scale_in * before[f"{key}.lora_B.weight"].double() @ before[f"{key}.lora_A.weight"].double()
        want = closed_form(delta, moments[module.name], 2, outputs[module.name])
        got = after[f"{key}.lora_B.weight"].double() @ after[f"{key}.lora_A.weight"].double()
        got *= config["lora_alpha"] / config["r"]
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5, module.name
        assert module.output is not None and module.output.after <= module.output.plain_svd * (1 + 1e-6)
    doc = json.loads((tmp_path / "r2" / "resize_report.json").read_text())
    assert doc["method"]["calibration"]["activations"] == "finetuned" and doc["notes"]


def test_resize_and_combine_calibration_mistakes(tuned, tmp_path):
    one_line_error(
        run_cli("resize", FIX_ADAPTER, "--rank", "2", "--calibration", prompts(tuned), "-o", tmp_path / "x"), "--base"
    )
    one_line_error(
        run_cli(
            "combine",
            FIX_ADAPTER,
            FIX_ADAPTER,
            "--base",
            FIX_BASE,
            "--calibration",
            prompts(tuned),
            "-o",
            tmp_path / "x",
        ),
        "target",
    )
    one_line_error(run_cli("resize", FIX_ADAPTER, "--rank", "2", "--base", FIX_BASE, "-o", tmp_path / "x"), "--base")
    assert not (tmp_path / "x").exists()


def test_combine_calibrated_leaves_less_output_error_than_the_plain_svd_at_every_module(tuned, tmp_path):
    r = run_cli(
        "combine",
        FIX_ADAPTER,
        FIX_ADAPTER,
        "--weight",
        "1",
        "--weight",
        "0.5",
        "--rank",
        "3",
        "--base",
        FIX_BASE,  # it carries a tokenizer
        "--calibration",
        prompts(tuned),
        "--calibration-model",
        "base",
        "-o",
        tmp_path / "c",
    )
    assert r.exit_code == 0, r.output
    assert "calibrated" in r.output and "the base's activations" in r.output
    doc = json.loads((tmp_path / "c" / "resize_report.json").read_text())
    assert all(m["rank"] == 3 and m["output"]["after"] <= m["output"]["plain_svd"] * (1 + 1e-6) for m in doc["modules"])
    assert sum(m["output"]["after"] for m in doc["modules"]) < 0.9 * sum(
        m["output"]["plain_svd"] for m in doc["modules"]
    )


def test_fewer_tokens_than_inputs_is_warned_and_noted(tuned, tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("a short sample\n")  # about 15 byte tokens; the MLP's down_proj has 128 inputs
    r = run_cli("extract", FIX_BASE, tuned, "--rank", "2", "--calibration", few, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    said = re.search(r"warning: --calibration: (\d+) tokens for modules of up to 128 inputs", r.stderr)
    assert said and int(said.group(1)) < 128, r.stderr
    notes = json.loads((tmp_path / "out" / "extract_report.json").read_text())["notes"]
    assert any(f"{said.group(1)} tokens for modules of up to 128 inputs" in n for n in notes)
    enough = run_cli("extract", FIX_BASE, tuned, "--rank", "2", "--calibration", prompts(tuned), "-o", tmp_path / "ok")
    assert enough.exit_code == 0 and "warning" not in enough.stderr, enough.stderr
