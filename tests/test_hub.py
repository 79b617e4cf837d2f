"""The Hub, through the real huggingface_hub client against a stand-in served on loopback (no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import make_fixtures as mf
import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, run_cli
from hub_server import HubStandIn, serving
from reference import read_folder
from safetensors.torch import load_file


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with serving(monkeypatch, tmp_path / "hf_cache") as server:
        server.add_folder("org/base", FIX_BASE)
        server.add_folder("org/adapter", FIX_ADAPTER)
        yield server


def test_merge_from_repo_ids_equals_merging_local_folders(hub, tmp_path):
    result = run_cli("merge", "org/base", "org/adapter", "-o", tmp_path / "from_hub")
    assert result.exit_code == 0, result.stderr
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "local").exit_code == 0
    a, b = read_folder(tmp_path / "from_hub"), read_folder(tmp_path / "local")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "from_hub" / "README.md").read_text()
    assert "base_model: org/base" in card and "`org/adapter`" in card
    assert {t for (m, p), t in zip(hub.requests, hub.token_seen, strict=True) if "org/" in p} == {
        "Bearer hf_test_token"
    }


def test_revision_pinning(hub, tmp_path):
    first = hub.repos["org/base"].refs["main"]
    changed = shutil.copytree(FIX_BASE, tmp_path / "changed")
    tensors = load_file(changed / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v * 2 for k, v in tensors.items()}, changed / "model.safetensors", metadata={"format": "pt"})
    hub.add_folder("org/base", changed)  # main moves on
    hub.repos["org/base"].refs["v1"] = first
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "ref").exit_code == 0
    ref = read_folder(tmp_path / "ref")
    for spec in (f"org/base@{first}", "org/base@v1"):
        out = tmp_path / spec.replace("/", "_").replace("@", "_")
        assert run_cli("merge", spec, "org/adapter", "-o", out).exit_code == 0
        pinned = read_folder(out)
        assert set(pinned) == set(ref) and all(torch.equal(t, ref[k]) for k, t in pinned.items())
        assert f"base_model: {spec}" in (out / "README.md").read_text()
    latest = run_cli("merge", "org/base", "org/adapter", "-o", tmp_path / "latest")
    assert latest.exit_code == 0
    assert not torch.equal(
        read_folder(tmp_path / "latest")["model.embed_tokens.weight"],
        read_folder(tmp_path / "ref")["model.embed_tokens.weight"],
    )


def test_only_the_needed_files_are_fetched(hub, tmp_path):
    repo = shutil.copytree(FIX_BASE, tmp_path / "busy")
    torch.save(load_file(repo / "model.safetensors"), repo / "pytorch_model.bin")  # the other format
    (repo / "README.md").write_text("# a card")
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.safetensors").write_bytes(b"\0" * 64)
    (repo / "tokenizer.json").write_text("{}")
    (repo / "training_args.bin").write_bytes(b"\0" * 8)
    hub.add_folder("org/busy", repo)
    assert run_cli("inspect", "org/busy").exit_code == 0
    assert sorted({p.rsplit("/", 1)[-1] for p in hub.downloaded()}) == [  # the weights' headers only, by range
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    sharded = mf.save_model(mf.build_model(mf.llama_config()), tmp_path / "sharded", max_shard_size="60KB")
    torch.save({}, sharded / "pytorch_model.bin")  # a second format, which must not be fetched
    hub.add_folder("org/sharded", sharded)
    hub.requests.clear()
    r = run_cli("inspect", "org/sharded")
    assert r.exit_code == 0, r.stderr
    fetched = sorted({p.rsplit("/", 1)[-1] for p in hub.downloaded()})
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert fetched == sorted(["config.json", "generation_config.json", "model.safetensors.index.json", *shards])


def test_push_merged_and_adapter_folders_with_cards(hub, tmp_path):
    r = run_cli(
        "merge", "org/base", "org/adapter", "-o", tmp_path / "merged", "--push-to-hub", "me/merged", "--private"
    )
    assert r.exit_code == 0, r.stderr
    assert "Pushed 6 files to me/merged" in r.stdout
    files = hub.files("me/merged")
    assert sorted(files) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert files["model.safetensors"] == (tmp_path / "merged" / "model.safetensors").read_bytes()
    assert hub.repos["me/merged"].private
    card = files["README.md"].decode()
    assert "base_model: org/base" in card and "base_model_relation: merge" in card
    assert (
        "library_name: transformers" in card and "- lora" in card and "lorasurgeon merge org/base org/adapter" in card
    )
    assert any("base_model: org/base" in text for text in hub.validated)

    r = run_cli(
        "extract", "org/base", tmp_path / "merged", "--rank", "8", "-o", tmp_path / "lora", "--push-to-hub", "me/lora"
    )
    assert r.exit_code == 0, r.stderr
    files = hub.files("me/lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "extract_report.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card and "base_model: org/base" in card
    assert "| `model.layers.0.self_attn.q_proj` | 8 |" in card and "of the fine-tune's change" in card
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/base"


def test_push_command_revision_and_pull_request(hub, tmp_path):
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "m").exit_code == 0
    r = run_cli("push", tmp_path / "m", "me/model", "--revision", "dev", "-m", "first")
    assert r.exit_code == 0, r.stderr
    assert "README.md" in hub.files("me/model", "dev") and "README.md" not in hub.files("me/model", "main")
    r = run_cli("push", tmp_path / "m", "me/model", "--create-pr")
    assert r.exit_code == 0 and "discussions/1" in r.stdout
    assert "model.safetensors" in hub.files("me/model", "refs/pr/1")


@pytest.mark.parametrize(
    "spec,phrase",
    [
        ("org/missing", "not found on the Hub"),
        ("org/base@nope", "no such revision"),
        ("org/gated", "gated"),
        ("org/empty", "no weights lorasurgeon can read"),
    ],
)
def test_input_errors_are_one_line(hub, tmp_path, spec, phrase):
    hub.add_folder("org/gated", FIX_BASE, gated=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing")
    hub.add_folder("org/empty", tmp_path / "empty")
    r = run_cli("merge", spec, "org/adapter", "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and phrase in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_unreachable_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    r = run_cli("inspect", "org/base")
    assert r.exit_code == 2 and "cannot" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("push", FIX_BASE, "me/x")
    assert r.exit_code == 2 and "me/x" in r.stderr


def test_environment_is_honoured_in_a_real_process(tmp_path):
    """HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE, as a user sets them, in a fresh process."""
    with HubStandIn() as server:
        server.add_folder("org/base", FIX_BASE)
        server.add_folder("org/adapter", FIX_ADAPTER)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=server.url, HF_TOKEN="hf_env", HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="0")
        cmd = [sys.executable, "-m", "lorasurgeon", "merge", "org/base", "org/adapter", "-q", "-o"]
        online = subprocess.run(cmd + [str(tmp_path / "a")], env=env, capture_output=True, text=True)
        assert online.returncode == 0, online.stderr
        repo_requests = [t for (m, p), t in zip(server.requests, server.token_seen, strict=True) if "org/" in p]
        assert repo_requests and set(repo_requests) == {"Bearer hf_env"}
        assert list((tmp_path / "home" / "hub").glob("models--org--base/snapshots/*/model.safetensors"))
    # the server is gone: offline, the cache serves; what is not cached is a clear error
    env["HF_HUB_OFFLINE"] = "1"
    offline = subprocess.run(cmd + [str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert offline.returncode == 0, offline.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", "inspect", "org/other"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "offline" in missing.stderr and "Traceback" not in missing.stderr


def _no_work_was_done(hub, out) -> None:
    assert not out.exists() and not [p for p in out.parent.iterdir() if "lorasurgeon" in p.name]
    assert not [p for m, p in hub.requests if "/resolve/" in p], "inputs were fetched before the push was checked"


@pytest.mark.parametrize("case", ["bad id", "no token", "wrong token", "offline"])
def test_push_to_hub_is_checked_before_any_work(hub, tmp_path, monkeypatch, case):
    from huggingface_hub import constants

    repo = "me/merged"
    if case == "bad id":
        repo, phrase = "me/my model", "not a Hub repo id"
    elif case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        phrase = "no Hub token to push with: set HF_TOKEN, or run `hf auth login`"
    elif case == "wrong token":
        hub.tokens = {"hf_someone_else"}
        phrase = "the Hub refuses this token (HTTP 401)"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        phrase = "HF_HUB_OFFLINE is set"
    hub.requests.clear()
    for command in (["merge", "org/base", "org/adapter"], ["extract", "org/base", FIX_BASE, "--rank", "2"]):
        r = run_cli(*command, "-o", tmp_path / "out", "--push-to-hub", repo)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and phrase in r.stderr, r.stderr
        _no_work_was_done(hub, tmp_path / "out")


def test_a_failed_push_keeps_the_result_and_says_how_to_retry(hub, tmp_path):
    hub.read_only_orgs = {"someone-else"}
    out = tmp_path / "my merged"
    r = run_cli("merge", "org/base", "org/adapter", "-o", out, "--push-to-hub", "someone-else/merged", "--private")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "You don't have the rights" in r.stderr
    retry = f"lorasurgeon push '{out}' someone-else/merged --private"
    assert f"the result is complete in {out}: retry the upload with `{retry}`" in r.stderr
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    hub.read_only_orgs.clear()  # the user is given the rights; the printed command now works
    again = run_cli("push", out, "someone-else/merged", "--private")
    assert again.exit_code == 0 and "Pushed 6 files to someone-else/merged" in again.stdout


def test_a_quantized_repo_fetches_only_the_weights_it_needs(hub, tmp_path):
    """gpt-oss and DeepSeek repos carry other copies (original/, metal/, inference/): only the top-level
    weights are fetched, and the result is the local folder's."""
    from quantize import quantized_folder

    repo = quantized_folder(FIX_BASE, tmp_path / "fp8", "fp8")
    for extra in ("original", "metal"):
        (repo / extra).mkdir()
        (repo / extra / "model.safetensors").write_bytes(b"\0" * 64)
    hub.add_folder("org/fp8", repo)
    r = run_cli("convert", "org/fp8", "--dtype", "bfloat16", "-o", tmp_path / "from_hub")
    assert r.exit_code == 0, r.stderr
    assert sorted({p.rsplit("/", 1)[-1] for p in hub.downloaded()}) == [  # the weights' headers only, by range
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert run_cli("convert", repo, "--dtype", "bfloat16", "-o", tmp_path / "local").exit_code == 0
    a, b = read_folder(tmp_path / "from_hub"), read_folder(tmp_path / "local")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_push_uploads_only_the_files_the_hub_does_not_hold(hub, tmp_path):
    """huggingface_hub asks the Hub for each file's oid first (preupload) and leaves out of the commit every file
    whose content the Hub already holds there: a re-push of an unchanged result uploads no file, a changed merge
    only the files that changed."""
    merged = tmp_path / "merged"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", merged, "--push-to-hub", "me/m").exit_code == 0
    first = dict(hub.uploaded)
    assert set(first) == {p.name for p in merged.iterdir()}
    hub.uploaded.clear()
    r = run_cli("push", merged, "me/m")
    assert r.exit_code == 0, r.stderr
    assert hub.uploaded == []  # nothing the Hub holds is sent again
    assert "Pushed 6 files to me/m (0 uploaded, 6 the Hub already held)" in r.stdout
    again = tmp_path / "again"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "--weight", "0.5", "-o", again, "-q").exit_code == 0
    r = run_cli("push", again, "me/m")
    assert r.exit_code == 0, r.stderr
    changed = {p.name for p in again.iterdir() if p.read_bytes() != (merged / p.name).read_bytes()}
    assert {path for path, _ in hub.uploaded} == changed and "model.safetensors" in changed
    assert "tokenizer.json" not in changed
    assert f"({len(changed)} uploaded, {6 - len(changed)} the Hub already held)" in r.stdout
