"""--calibration SOURCE as token ids (calibration.samples, hub.dataset): text, JSON Lines, JSON, CSV and Parquet
files, folders and Hub datasets (the real huggingface_hub client against tests/hub_server.py on loopback), each
sample checked against the tokenizer itself (a small WordLevel one built here, with and without a chat template)."""

from __future__ import annotations

import csv
import gzip
import json
import sys

import pytest
from hub_server import serving

from lorasurgeon.calibration.samples import Samples, read_samples
from lorasurgeon.errors import InputNotFoundError, InvalidOptionError, LorasurgeonError, UnsupportedError
from lorasurgeon.hub.dataset import data_splits

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi "
    "chi psi omega red green blue cat dog sat ran on the mat sun moon"
).split()
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"


def sentence(i: int, n: int = 4) -> str:
    """The i-th test sentence: ``n`` words of the vocabulary, different for each i."""
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def build_tokenizer(folder, chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "user", "assistant", "system", ".", ",", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """(folder, tokenizer) with a chat template, and without one."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "chat": (root / "chat", build_tokenizer(root / "chat", TEMPLATE)),
        "plain": (root / "plain", build_tokenizer(root / "plain", None)),
    }


def text_ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def chat_ids(tok, messages) -> list[int]:
    return tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def conversation(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": sentence(i)}, {"role": "assistant", "content": sentence(i + 100, 6)}]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def refusal(excinfo) -> str:
    """The message as the CLI prints it (options as flags), checked to be one line."""
    text = excinfo.value.args[0]
    assert "\n" not in text and "Traceback" not in text, text
    return text


# --- text files ------------------------------------------------------------------------------------------------


def test_text_paragraphs(toks, tmp_path):
    folder, tok = toks["plain"]
    paragraphs = [f"{sentence(0)}\n{sentence(1)}", sentence(2), f"{sentence(3)}\n{sentence(4)}\n{sentence(5)}"]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n" + "\n\n\n".join(paragraphs) + "\n  \n")
    got = read_samples(path, folder)
    assert got.ids == [text_ids(tok, p) for p in paragraphs]
    assert got.ids[0][0] == tok.bos_token_id and got.ids[0][-1] == tok.eos_token_id
    assert got.source.startswith(f"{path}: all 3 paragraphs, fewer than the 128 asked for (plain text)")
    assert f"{got.tokens:,} tokens" in got.source and got.tokens == sum(map(len, got.ids))


def test_text_lines_where_no_blank_line_separates(toks, tmp_path):
    folder, tok = toks["chat"]  # plain text is text, whatever the tokenizer's template
    lines = [sentence(i) for i in range(5)]
    path = tmp_path / "lines.md"  # any extension but JSON's, CSV's, Parquet's is text
    path.write_text("\n" + "\n".join(lines) + "\n\n")  # blank lines only around the one paragraph
    got = read_samples(path, folder, samples=3)
    assert got.ids == [text_ids(tok, line) for line in lines[:3]]
    assert "the first 3 lines (plain text)" in got.source


def test_compressed_text(toks, tmp_path):
    folder, tok = toks["plain"]
    path = tmp_path / "notes.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(f"{sentence(1)}\n\n{sentence(2)}\n")
    assert read_samples(path, folder).ids == [text_ids(tok, sentence(1)), text_ids(tok, sentence(2))]


# --- records ---------------------------------------------------------------------------------------------------


def test_jsonl_messages_with_the_chat_template(toks, tmp_path):
    folder, tok = toks["chat"]
    path = tmp_path / "chats.jsonl"
    write_jsonl(path, [{"messages": conversation(i), "id": i} for i in range(4)])
    got = read_samples(path, folder)
    assert got.ids == [chat_ids(tok, conversation(i)) for i in range(4)]
    assert got.ids[0][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("user")]  # the template's BOS, once
    assert "(messages, the model's chat template)" in got.source


def test_jsonl_messages_without_a_template_are_joined_text(toks, tmp_path):
    folder, tok = toks["plain"]
    path = tmp_path / "chats.jsonl"
    write_jsonl(path, [{"messages": conversation(i)} for i in range(3)])
    got = read_samples(path, folder)
    assert got.ids == [text_ids(tok, "\n".join(m["content"] for m in conversation(i))) for i in range(3)]
    assert "(messages, no chat template: contents joined by newlines)" in got.source


def test_sharegpt_conversations(toks, tmp_path):
    folder, tok = toks["chat"]
    path = tmp_path / "sharegpt.json"
    turns = [{"from": "human", "value": sentence(1)}, {"from": "gpt", "value": sentence(2)}]
    path.write_text(json.dumps([{"conversations": turns}]))
    expected = [{"role": "user", "content": sentence(1)}, {"role": "assistant", "content": sentence(2)}]
    assert read_samples(path, folder).ids == [chat_ids(tok, expected)]


def test_jsonl_text_and_empty_records_skipped(toks, tmp_path):
    folder, tok = toks["plain"]
    path = tmp_path / "texts.jsonl"
    records = [{"text": sentence(0)}, {"text": "   "}, {"text": None}, {"text": sentence(1)}, {"text": sentence(2)}]
    path.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n" + "\n".join(map(json.dumps, records[3:])))
    got = read_samples(path, folder, samples=2)
    assert got.ids == [text_ids(tok, sentence(0)), text_ids(tok, sentence(1))]
    assert got.source.startswith(f"{path}: the first 2 records (text)") and "2 empty skipped" in got.source


def test_prompt_completion_text_and_conversational(toks, tmp_path):
    folder, tok = toks["chat"]
    path = tmp_path / "pc.jsonl"
    prompt, completion = conversation(5)[:1], conversation(5)[1:]
    write_jsonl(
        path,
        [
            {"prompt": sentence(1) + " ", "completion": sentence(2)},
            {"prompt": prompt, "completion": completion},
            {"prompt": sentence(3)},  # prompt-only
        ],
    )
    got = read_samples(path, folder)
    assert got.ids == [
        text_ids(tok, sentence(1) + " " + sentence(2)),
        chat_ids(tok, prompt + completion),
        text_ids(tok, sentence(3)),
    ]
    assert "prompt + completion; prompt + completion, the model's chat template; prompt" in got.source


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_list_and_object_holding_one(toks, tmp_path, wrapped):
    folder, tok = toks["plain"]
    records = [{"content": sentence(i)} for i in range(3)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"version": 2, "data": records} if wrapped else records, indent=2))
    got = read_samples(path, folder)
    assert got.ids == [text_ids(tok, sentence(i)) for i in range(3)]
    assert "all 3 records" in got.source and "(content)" in got.source
    path.write_text(json.dumps({"a": records, "b": records}))
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, folder)
    assert "an object with more than one list of records (its keys: a, b)" in refusal(e)


def test_json_lines_under_a_json_name(toks, tmp_path):
    folder, tok = toks["plain"]
    path = tmp_path / "records.json"
    write_jsonl(path, [{"text": sentence(i)} for i in range(2)])
    assert read_samples(path, folder).ids == [text_ids(tok, sentence(i)) for i in range(2)]


def test_csv(toks, tmp_path):
    folder, tok = toks["plain"]
    path = tmp_path / "rows.csv"
    texts = [f"{sentence(0)}, {sentence(1)}", f"{sentence(2)}\n{sentence(3)}", sentence(4)]  # a comma, a newline
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, t] for i, t in enumerate(texts))
    assert read_samples(path, folder).ids == [text_ids(tok, t) for t in texts]


def test_column_option_takes_that_field(toks, tmp_path):
    folder, tok = toks["plain"]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"text": sentence(i), "body": sentence(i + 50, 6)} for i in range(3)])
    got = read_samples(path, folder, column="body")
    assert got.ids == [text_ids(tok, sentence(i + 50, 6)) for i in range(3)]
    assert "(body)" in got.source


def test_wrong_column_and_no_known_field_list_the_fields(toks, tmp_path):
    folder, _ = toks["plain"]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"question": sentence(1), "answer": sentence(2)}])
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, folder, column="body")
    assert refusal(e) == f"--calibration-column body: {path} line 1 has no such field (it has: question, answer)"
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, folder)
    text = refusal(e)
    assert "no messages, conversations, text, prompt, content field (it has: question, answer)" in text
    assert "--calibration-column" in text
    with pytest.raises(InvalidOptionError) as e:
        read_samples(tmp_path / "pairs.jsonl", folder, column="question", samples=0)
    assert "--calibration-samples must be a whole number of at least 1, not 0" in refusal(e)


def test_max_length_cuts_each_sample(toks, tmp_path):
    folder, tok = toks["plain"]
    path = tmp_path / "texts.jsonl"
    write_jsonl(path, [{"text": sentence(i, 2 + 3 * i)} for i in range(4)])
    got = read_samples(path, folder, samples=3, max_length=6)
    full = [text_ids(tok, sentence(i, 2 + 3 * i)) for i in range(3)]
    assert got.ids == [ids[:6] for ids in full] and [len(s) for s in got.ids] == [4, 6, 6]
    assert "the first 3 records" in got.source and "2 cut to 6 tokens" in got.source


@pytest.mark.parametrize(
    "options,flag",
    [({"samples": 0}, "--calibration-samples"), ({"max_length": 0}, "--max-length"), ({"samples": True}, "samples")],
)
def test_bad_counts_are_refused(toks, tmp_path, options, flag):
    path = tmp_path / "t.txt"
    path.write_text("alpha")
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, toks["plain"][0], **options)
    assert flag in refusal(e)


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.txt", "\n \n\n"), ("empty.jsonl", "\n")])
def test_a_source_without_samples_is_refused(toks, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, toks["plain"][0])
    assert refusal(e) == f"--calibration {path}: no sample to calibrate on (it holds nothing)"


def test_bad_json_is_refused_with_its_line(toks, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"text": "alpha"}) + "\n\n" + '{"text": "beta",}\n')
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, toks["plain"][0])
    assert refusal(e).startswith(f"--calibration {path}: line 3 is not JSON (")
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "alpha"},\n  {"text": beta}\n]')
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, toks["plain"][0])
    assert refusal(e).startswith(f"--calibration {path}: line 3 is not JSON (")


def test_records_that_hold_no_sample_are_refused_by_name(toks, tmp_path):
    folder, _ = toks["chat"]
    path = tmp_path / "odd.jsonl"
    write_jsonl(path, [{"messages": [{"speaker": "a", "words": "alpha"}]}])
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, folder)
    assert refusal(e) == (
        f"--calibration {path} line 1: messages[0] is not a message, a role and its content (it has: speaker, words)"
    )
    write_jsonl(path, [{"text": 3}])
    with pytest.raises(InvalidOptionError) as e:
        read_samples(path, folder)
    assert "text holds int, not text or messages" in refusal(e)
    write_jsonl(path, [[1, 2]])
    with pytest.raises(InvalidOptionError, match="a record is a list"):
        read_samples(path, folder)


def test_no_tokenizer_is_refused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("alpha")
    (tmp_path / "model").mkdir()
    with pytest.raises(InputNotFoundError) as e:
        read_samples(path, tmp_path / "model")
    assert refusal(e) == (
        f"{tmp_path / 'model'}: no tokenizer beside the model (tokenizer.json, tokenizer_config.json): the calibration "
        "text cannot be tokenized"
    )


def test_missing_transformers_and_pyarrow_are_named(toks, tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("alpha")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(UnsupportedError) as e:
        read_samples(path, toks["plain"][0])
    assert "pip install transformers" in refusal(e)
    monkeypatch.undo()
    pytest.importorskip("pyarrow")
    parquet = tmp_path / "t.parquet"
    write_parquet(parquet, {"text": ["alpha"]})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UnsupportedError) as e:
        read_samples(parquet, toks["plain"][0])
    assert refusal(e) == f"--calibration {parquet}: reading Parquet needs pyarrow: pip install pyarrow"


def test_unreadable_formats_are_refused(toks, tmp_path):
    path = tmp_path / "shard.arrow"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(UnsupportedError) as e:
        read_samples(path, toks["plain"][0])
    assert ".arrow files are not read" in refusal(e)


def test_a_mistyped_path_is_not_sent_to_the_hub(toks, tmp_path, monkeypatch):
    folder, _ = toks["plain"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text('{"text": "alpha"}\n')
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a Hub request would say so
    for spec, hint in [
        ("./data/promts.jsonl", " (did you mean data/prompts.jsonl?)"),
        ("data/promts.jsonl", " (did you mean data/prompts.jsonl?)"),
        ("data/q", ""),
    ]:
        with pytest.raises(InputNotFoundError) as e:
            read_samples(spec, folder)
        assert refusal(e) == f"--calibration {spec}: no such file or folder{hint}"


def test_a_local_folder_is_read_by_split(toks, tmp_path):
    folder, tok = toks["plain"]
    data = tmp_path / "ds"
    (data / "train").mkdir(parents=True)
    (data / "validation").mkdir()
    write_jsonl(data / "train" / "a.jsonl", [{"text": sentence(1)}])
    write_jsonl(data / "train" / "b.jsonl", [{"text": sentence(2)}])
    write_jsonl(data / "validation" / "a.jsonl", [{"text": sentence(3)}])
    (data / "README.md").write_text("# card")
    got = read_samples(data, folder)
    assert got.ids == [text_ids(tok, sentence(1)), text_ids(tok, sentence(2))]
    assert got.source.startswith(f"{data}, split train: all 2 records")
    assert read_samples(data, folder, split="validation").ids == [text_ids(tok, sentence(3))]


# --- the split's files, as datasets' default patterns pick them --------------------------------------------------


@pytest.mark.parametrize(
    "files,expected",
    [
        (["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"],
         {"train": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
          "test": ["data/test-00000-of-00001.parquet"]}),
        (["data/train_sft-00000-of-00001.parquet", "train.jsonl"],
         {"train_sft": ["data/train_sft-00000-of-00001.parquet"]}),
        (["train.jsonl", "test.jsonl", "dev.jsonl", "README.md"],
         {"train": ["train.jsonl"], "validation": ["dev.jsonl"], "test": ["test.jsonl"]}),
        (["my-train-set.csv", "my_eval.csv"], {"train": ["my-train-set.csv"], "test": ["my_eval.csv"]}),
        (["training/a.json", "validation/b.json", "test_x.json"],
         {"train": ["training/a.json"], "validation": ["validation/b.json"]}),  # folders first
        (["data.jsonl", "README.md", ".gitattributes", "notes/__pycache__/x.json"], {"train": ["data.jsonl"]}),
        (["trainer.py", "strain.csv"], {"train": ["strain.csv"]}),  # neither names the split: all data is train
        (["README.md", "model.py"], {}),
    ],
)  # fmt: skip
def test_data_splits(files, expected):
    assert data_splits(files) == expected


# --- a Hub dataset, served for real on loopback ------------------------------------------------------------------


def write_parquet(path, columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=2)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with serving(monkeypatch, tmp_path / "hf_cache") as server:
        yield server


def test_hub_jsonl_split(hub, toks, tmp_path, monkeypatch):
    folder, tok = toks["chat"]
    repo = tmp_path / "repo"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", [{"messages": conversation(i)} for i in range(3)])
    write_jsonl(repo / "test.jsonl", [{"text": sentence(i)} for i in range(3)])
    (repo / "README.md").write_text("# a card")
    hub.add_folder("org/chats", repo, repo_type="dataset")
    got = read_samples("org/chats", folder, samples=2)
    assert got.ids == [chat_ids(tok, conversation(i)) for i in range(2)]
    assert got.source.startswith("org/chats, split train: the first 2 records (messages, the model's chat template)")
    assert hub.downloaded() == ["/datasets/org/chats/resolve/main/train.jsonl"]
    test = read_samples("org/chats", folder, split="test")
    assert test.ids == [text_ids(tok, sentence(i)) for i in range(3)]
    # offline, the cache serves what was read
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert read_samples("org/chats", folder, samples=2).ids == got.ids
    assert len(hub.requests) == before
    with pytest.raises(InputNotFoundError) as e:
        read_samples("org/chats", folder, split="validation")
    assert refusal(e) == (
        "--calibration-split validation: org/chats (offline: the files in the cache) has no such split (it has: "
        "train (1 file), test (1 file))"
    )
    with pytest.raises(InputNotFoundError) as e:
        read_samples("org/other", folder)
    assert "offline (HF_HUB_OFFLINE) and not in the local cache" in refusal(e)


def test_hub_parquet_shards_read_only_as_far_as_needed(hub, toks, tmp_path):
    pytest.importorskip("pyarrow")
    folder, tok = toks["plain"]
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for shard in range(2):
        texts = [sentence(10 * shard + i) for i in range(5)]
        write_parquet(repo / "data" / f"train-0000{shard}-of-00002.parquet", {"text": texts, "n": list(range(5))})
    write_parquet(repo / "data" / "validation-00000-of-00001.parquet", {"text": [sentence(99)]})
    hub.add_folder("org/pq", repo, repo_type="dataset")
    got = read_samples("org/pq", folder, samples=4)
    assert got.ids == [text_ids(tok, sentence(i)) for i in range(4)]
    assert hub.downloaded() == ["/datasets/org/pq/resolve/main/data/train-00000-of-00002.parquet"]
    got = read_samples("org/pq", folder, samples=7)
    assert got.ids == [text_ids(tok, sentence(i)) for i in [0, 1, 2, 3, 4, 10, 11]]
    assert read_samples("org/pq", folder, split="validation").ids == [text_ids(tok, sentence(99))]
    with pytest.raises(InvalidOptionError) as e:
        read_samples("org/pq", folder, column="body")
    assert refusal(e) == (
        "--calibration-column body: org/pq data/train-00000-of-00002.parquet has no such column (it has: text, n)"
    )


def test_hub_revision_split_and_missing_repo(hub, toks, tmp_path):
    folder, tok = toks["plain"]
    repo = tmp_path / "repo"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", [{"text": sentence(1)}])
    first = hub.add_folder("org/ds", repo, repo_type="dataset")
    write_jsonl(repo / "train.jsonl", [{"text": sentence(2)}])
    write_jsonl(repo / "validation.jsonl", [{"text": sentence(3)}])
    hub.add_folder("org/ds", repo, repo_type="dataset")
    hub.datasets["org/ds"].refs["v1"] = first
    assert read_samples("org/ds", folder).ids == [text_ids(tok, sentence(2))]
    for spec in ("org/ds@v1", f"org/ds@{first}"):
        got = read_samples(spec, folder)
        assert got.ids == [text_ids(tok, sentence(1))] and got.source.startswith(
            f"{spec}, split train: its one record, fewer"
        )
    with pytest.raises(InputNotFoundError) as e:
        read_samples("org/ds", folder, split="test")
    assert refusal(e) == (
        "--calibration-split test: org/ds has no such split (it has: train (1 file), validation (1 file))"
    )
    with pytest.raises(InputNotFoundError) as e:
        read_samples("org/ds@v9", folder)
    assert refusal(e) == "--calibration org/ds@v9: no such revision of the dataset on the Hub"
    with pytest.raises(InputNotFoundError) as e:
        read_samples("org/missing", folder)
    assert refusal(e) == (
        "--calibration org/missing: not a local file or folder, and no such dataset on the Hub (private? set HF_TOKEN)"
    )
    hub.add_folder("org/model", repo)  # a model repo is not a dataset
    with pytest.raises(InputNotFoundError, match="no such dataset"):
        read_samples("org/model", folder)


def test_hub_gated_unreachable_and_unreadable(hub, toks, tmp_path, monkeypatch):
    folder, _ = toks["plain"]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.arrow").write_bytes(b"\0" * 8)
    hub.add_folder("org/gated", repo, repo_type="dataset", gated=True)
    hub.add_folder("org/arrow", repo, repo_type="dataset")
    with pytest.raises(LorasurgeonError) as e:
        read_samples("org/gated", folder)
    assert "this dataset is gated" in refusal(e)
    with pytest.raises(UnsupportedError) as e:
        read_samples("org/arrow", folder)
    assert refusal(e).startswith("--calibration org/arrow train.arrow: .arrow files are not read")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(LorasurgeonError) as e:
        read_samples("org/any", folder)
    assert "cannot be reached" in refusal(e) or "cannot download" in refusal(e)


def test_samples_is_the_interface(toks, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("alpha beta")
    got = read_samples(str(path), toks["plain"][0])
    assert isinstance(got, Samples) and got.tokens == 4 and all(isinstance(t, int) for t in got.ids[0])
