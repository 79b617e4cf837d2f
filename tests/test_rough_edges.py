"""Rough edges users reported: what model cards record, the command a refusal suggests, what check says of an
adapter that does not load, help texts, counts in words, and `lorasurgeon` with no command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, ROOT, one_line_error, run_cli

from lorasurgeon.words import plural


def card(folder: Path) -> str:
    return (folder / "README.md").read_text()


def test_every_card_names_its_folder_and_says_how_it_was_made(tmp_path):
    out = tmp_path / "out1"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out / "sub", "-q").exit_code == 0
    assert run_cli("resize", FIX_ADAPTER, "--rank", 4, "-o", out / "r", "-q").exit_code == 0
    combined = ["combine", FIX_ADAPTER, FIX_ADAPTER, "--weight", 1, "--weight", 0.5, "--energy", 0.9]
    assert run_cli(*combined, "-o", out / "c", "-q").exit_code == 0
    for name, command in (("sub", "merge"), ("r", "resize"), ("c", "combine")):
        text = card(out / name)
        assert f"\n# {name}\n" in text, text  # the title: the folder's name, the result's name on the Hub
        assert f"Made by:\n```bash\nlorasurgeon {command} " in text and f" -o {name}\n```" in text, text
        assert str(out) not in text, text  # the output's local path is not published
    assert "{'" not in card(out / "r") and "(rank 4)" in card(out / "r")
    assert "(energy 0.9)" in card(out / "c") and "--weight=1 --weight=0.5 --energy=0.9 -o c" in card(out / "c")


def test_resize_card_s_command_makes_the_same_adapter_again(tmp_path):
    assert run_cli("resize", FIX_ADAPTER, "--budget", "20KB", "-o", tmp_path / "first", "-q").exit_code == 0
    made_by = card(tmp_path / "first").split("```bash\n")[1].split("\n```")[0].split()
    assert made_by[:3] == ["lorasurgeon", "resize", str(FIX_ADAPTER)] and made_by[-2:] == ["-o", "first"]
    assert run_cli(*made_by[1:-1], tmp_path / "again", "-q").exit_code == 0
    first, again = (
        (tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("first", "again")
    )  # the same ranks, the same factors
    assert first == again


def test_convert_of_an_adapter_to_merged_suggests_the_merge_that_does_it(tmp_path):
    out = tmp_path / "out"
    line = one_line_error(
        run_cli("convert", FIX_ADAPTER, "--to", "merged", "-o", out), f"`lorasurgeon merge BASE {FIX_ADAPTER} -o {out}`"
    )
    assert "--form augmented" not in line
    one_line_error(run_cli("convert", FIX_ADAPTER, "--to", "adapter", "-o", out), "it is already an adapter")


@pytest.fixture(scope="module")
def dora(tmp_path_factory) -> Path:
    """A DoRA adapter of the committed base, written by PEFT."""
    import transformers
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("dora") / "adapter"
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(FIX_BASE)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=["q_proj"])
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_check_states_a_max_lora_rank_only_for_what_loads(dora):
    refused = run_cli("check", dora, "--for", "vllm")
    assert refused.exit_code == 1 and "will not load" in refused.output and "dora" in refused.output
    assert "max-lora-rank" not in refused.output, refused.output
    assert '"max_lora_rank": null' in run_cli("check", dora, "--for", "vllm", "--json").output
    loads = run_cli("check", FIX_ADAPTER, "--for", "vllm")
    assert loads.exit_code == 0 and "(needs --max-lora-rank 8 or more)" in loads.output


def _help(command: str, option: str) -> str:
    from lorasurgeon.cli import cli

    (param,) = [p for p in cli.commands[command].params if option in p.opts]
    return str(getattr(param, "help", ""))


def test_help_texts_are_one_wording_and_name_their_defaults():
    from lorasurgeon.cli.options import CONSUMER
    from lorasurgeon.commands.extract.settings import BUDGET_RANK

    writing = {_help(c, "--for") for c in ("convert", "extract", "resize", "combine")}
    assert len(writing) == 1 and next(iter(writing)).startswith(CONSUMER), writing
    assert _help("check", "--for").startswith(CONSUMER)
    assert "a .gguf file with --to gguf" in _help("convert", "-o")
    assert f"--budget (default: {BUDGET_RANK})" in _help("extract", "--max-rank")
    assert all("default: none" in _help(c, "--max-rank") for c in ("extract", "resize", "combine"))


def test_counts_are_in_words():
    from lorasurgeon.commands.convert import GgufReport
    from lorasurgeon.commands.resize.report import ModuleResult, ResizeReport
    from lorasurgeon.commands.verify import VerifyProblem, VerifyReport
    from lorasurgeon.hub.push import PushReport

    assert [plural(n, "tensor") for n in (0, 1, 2, 1234)] == ["0 tensors", "1 tensor", "2 tensors", "1,234 tensors"]
    assert plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"
    one = ResizeReport("out", ["a"], [1.0], {"rank": 4}, [ModuleResult("m", 8, 4, 0.9, 1.0)], 16, 8, 0.9, copied=["t"])
    assert ": 1 module, " in one.summary() and "; 1 tensor copied" in one.summary()
    verified = VerifyReport("x", 1, 8, [VerifyProblem("f", "bad")]).summary()
    assert verified.startswith("verify: read 1 tensor (8 bytes): 1 problem")
    assert PushReport("me/x", "https://hub/x", 1).summary().startswith("Pushed 1 file to")
    assert ", 1 tensor, " in GgufReport("x.gguf", "llama", 1, 16.0).summary()


def test_one_weight_for_two_adapters_is_said_in_words(tmp_path):
    result = run_cli("combine", FIX_ADAPTER, FIX_ADAPTER, "--weight", 1, "-o", tmp_path / "c")
    one_line_error(result, "1 weight for 2 adapters")


def test_lorasurgeon_alone_prints_the_help_and_succeeds():
    done = subprocess.run([sys.executable, "-m", "lorasurgeon"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: lorasurgeon [OPTIONS] COMMAND [ARGS]...") and "merge" in done.stdout
