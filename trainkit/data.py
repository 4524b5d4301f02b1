"""Data: records from files, an installed package or the hub → token documents → fixed-length rows.

Every stage is an arrow file under ``<cache_dir>/data/`` named by a fingerprint of the source files,
the data settings and the tokenizer, so a second build (or another rank) memory-maps it instead of
tokenizing again. Rows carry pre-shifted labels: ``labels[t]`` is the target for the logits at
position ``t`` (the next token of the same document) or -100, so the loss needs no shifting.
``StepSampler`` picks the rows of each optimizer step from the step number alone.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Sequence, Value, load_dataset

from trainkit.config import ConfigError, DataConfig
from trainkit.spec import check_data
from trainkit.weights import PYPI_PREFIX, resolve_source

CACHE_VERSION = 1  # bump when the stored layout changes, so old caches are not read
EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
REQUIRED_FIELDS = {
    "text": ("text_field",),
    "chat": ("messages_field",),
    "instruction": ("prompt_field", "response_field"),
}
ROW_COLUMNS = ("input_ids", "labels", "position_ids", "document_ids")
DOCUMENT_FEATURES = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})


class TokenRows:
    """Fixed-length rows in a memory-mapped arrow ``Dataset``; ``batch`` returns int64 [n, seq_len]."""

    def __init__(self, rows: Dataset):
        self.rows = rows.with_format("numpy")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        picked = self.rows[list(indices)]
        return {name: torch.tensor(picked[name], dtype=torch.long) for name in ROW_COLUMNS}


def build_datasets(cfg: DataConfig, tokenizer, cache_dir: str) -> tuple[TokenRows, TokenRows]:
    """Train and eval rows; eval holds ``cfg.eval_fraction`` of the records, chosen by a seeded shuffle."""
    check_data(cfg, max_positions=cfg.seq_len)  # the job spec's checks, for callers without a spec
    _check_tokenizer(cfg, tokenizer)
    files = _source_files(cfg.source)
    records = _load_records(cfg, files, os.path.join(cache_dir, "data", "hf"))
    _check_fields(cfg, records)
    key = _cache_key(cfg, files, tokenizer)
    train_ids, eval_ids = _split(len(records), cfg.eval_fraction, cfg.seed)
    cache = Path(cache_dir, "data")
    cache.mkdir(parents=True, exist_ok=True)
    train_docs = _documents(records.select(train_ids), cfg, tokenizer, cache / f"{key}-train-docs")
    if len(train_docs) == 0:
        raise ConfigError(
            f"data.source={cfg.source!r} gives no tokens to learn from after tokenization "
            f"(data.kind={cfg.kind}): check data.kind and its field settings"
        )
    eval_docs = _documents(records.select(eval_ids), cfg, tokenizer, cache / f"{key}-eval-docs")
    layout = "packed" if cfg.pack else "padded"
    train = _rows(train_docs, cfg, tokenizer, cache / f"{key}-train-{layout}")
    return TokenRows(train), TokenRows(_rows(eval_docs, cfg, tokenizer, cache / f"{key}-eval-{layout}"))


class StepSampler:
    """The rows of each optimizer step, derived from the step number alone: resuming needs no state.

    Each epoch is a seeded permutation of all rows and epochs follow each other, so a global batch
    may span two. The global batch is the same for every world size; rank r takes its r-th chunk.
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int):
        if num_rows <= 0:
            raise ConfigError("the training data has 0 rows: point data.source at data with text in it")
        if global_batch_size <= 0:
            raise ConfigError(f"global batch size {global_batch_size} must be > 0: set train.micro_batch_size >= 1")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch_size
        positions = range(start, start + self.global_batch_size)
        return [int(_epoch_order(self.num_rows, self.seed, p // self.num_rows)[p % self.num_rows]) for p in positions]

    def micro_batches(self, step: int, rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
        micro, rest = divmod(self.global_batch_size, world_size * grad_accum)
        if rest or micro == 0:
            raise ConfigError(
                f"global batch size {self.global_batch_size} does not split into {world_size} ranks x "
                f"{grad_accum} micro-batches: set train.grad_accum_steps so that it divides"
            )
        per_rank = micro * grad_accum
        mine = self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i * micro : (i + 1) * micro] for i in range(grad_accum)]


@functools.lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def _check_tokenizer(cfg: DataConfig, tokenizer) -> None:
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise ConfigError("data.add_eos=true but the tokenizer has no eos token: set data.add_eos=false")
    if cfg.kind == "chat" and not tokenizer.chat_template:
        raise ConfigError(
            "data.kind=chat but the tokenizer has no chat_template: use a chat tokenizer or data.kind=instruction"
        )


def _source_files(source: str) -> list[str] | None:
    """The local files ``source`` names, sorted; None when it is a hub dataset name."""
    # resolve_source finds a pypi: package folder without importing the package.
    path = Path(resolve_source(source, "data.source") if source.startswith(PYPI_PREFIX) else source).expanduser()
    if any(ch in str(path) for ch in "*?["):
        files, problem = glob.glob(str(path), recursive=True), "no files match"
    elif path.is_dir():
        files, problem = [str(p) for p in path.iterdir() if not p.name.startswith(".")], "the folder holds no files"
    elif path.is_file():
        return [str(path)]
    elif _is_hub_name(source):
        return None
    else:
        raise ConfigError(f"data.source={source!r} does not exist: point it at a file, folder, glob or hub dataset")
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise ConfigError(f"data.source={source!r}: {problem}; point data.source at data files")
    return files


def _is_hub_name(source: str) -> bool:
    looks_local = source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in EXTENSION_FORMATS
    return not looks_local


def _load_records(cfg: DataConfig, files: list[str] | None, hf_cache: str) -> Dataset:
    if files is None:
        try:
            return load_dataset(cfg.source, split="train", cache_dir=hf_cache)
        except Exception as err:  # network, auth or name problems: all mean the same fix
            raise ConfigError(
                f"data.source={cfg.source!r} is no local path and could not be loaded from the hub "
                f"({type(err).__name__}): point data.source at a file, folder, glob or pypi:<module>/<folder>"
            ) from err
    file_format = _file_format(cfg, files)
    empty = ConfigError(f"data.source={cfg.source!r} holds 0 records: point data.source at non-empty data")
    if not any(os.path.getsize(f) for f in files):  # the loaders cannot infer columns from nothing
        raise empty
    options = {"sample_by": cfg.sample_by} if file_format == "text" else {}
    records = load_dataset(file_format, data_files=files, split="train", cache_dir=hf_cache, **options)
    if len(records) == 0:
        raise empty
    return records


def _file_format(cfg: DataConfig, files: list[str]) -> str:
    if cfg.format != "auto":
        return cfg.format
    formats = {EXTENSION_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) > 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})
        raise ConfigError(
            f"data.format=auto cannot tell the format of {cfg.source!r} (extensions: {', '.join(suffixes)}): "
            "set data.format to text, json or parquet, or keep one kind of file"
        )
    return formats.pop()


def _check_fields(cfg: DataConfig, records: Dataset) -> None:
    columns = records.column_names
    for name in REQUIRED_FIELDS[cfg.kind]:
        column, default = getattr(cfg, name), getattr(DataConfig, name)
        if column not in columns:
            fix = f"set data.{name}={default}" if default in columns else f"set data.{name} to one of them"
            raise ConfigError(
                f"data.{name}={column!r} is not a column of {cfg.source} (columns: {', '.join(columns)}); {fix}"
            )


def _cache_key(cfg: DataConfig, files: list[str] | None, tokenizer) -> str:
    """Changes whenever the files, the settings that shape tokens or the tokenizer change."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "pack")}
    sources = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files or []]
    tokenizer_id = [
        tokenizer.backend_tokenizer.to_str(),
        tokenizer.chat_template,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ]
    parts = json.dumps([CACHE_VERSION, settings, sources, tokenizer_id], default=str)
    return hashlib.sha256(parts.encode()).hexdigest()[:20]


def _split(num_records: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and eval record indices, each in file order; at least one eval record when asked for."""
    held_out = int(num_records * eval_fraction)
    if eval_fraction > 0 and held_out == 0 and num_records >= 2:
        held_out = 1
    order = np.random.default_rng(seed).permutation(num_records)
    return sorted(order[held_out:].tolist()), sorted(order[:held_out].tolist())


def _cached_map(source: Dataset, fn, path: Path, features: Features, batch_size: int, **fn_kwargs) -> Dataset:
    if len(source) == 0:  # map on nothing would drop the columns
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return source.map(
        fn,
        batched=True,
        batch_size=batch_size,
        fn_kwargs=fn_kwargs,
        remove_columns=source.column_names,
        features=features,
        cache_file_name=f"{path}.arrow",
        new_fingerprint=path.name,  # ours: hashing the tokenizer and closures would be slow
        desc=path.name.split("-", 1)[1],
    )


def _documents(records: Dataset, cfg: DataConfig, tokenizer, path: Path) -> Dataset:
    """One row per token document of at most ``seq_len`` tokens, with its shifted labels."""
    docs = _cached_map(records, _tokenize_batch, path, DOCUMENT_FEATURES, 256, cfg=cfg, tokenizer=tokenizer)
    if len(docs):
        longest = pc.max(pc.list_value_length(docs.data.column("input_ids"))).as_py()
        if longest > cfg.seq_len:
            raise ConfigError(
                f"data.seq_len={cfg.seq_len} is shorter than a {cfg.kind} record of {longest} tokens: "
                f"raise data.seq_len to at least {longest} or drop long records"
            )
    return docs


def _tokenize_batch(batch: dict, cfg: DataConfig, tokenizer) -> dict:
    documents = _text_documents if cfg.kind == "text" else _prompted_documents
    out = {"input_ids": [], "labels": []}
    for ids, is_target in documents(batch, cfg, tokenizer):
        labels = np.append(np.where(is_target[1:], ids[1:], -100), -100)
        if (labels != -100).any():  # a document with nothing to predict only costs space
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


def _text_documents(batch: dict, cfg: DataConfig, tokenizer):
    """Every token is a target; documents longer than ``seq_len`` become ``seq_len`` windows."""
    eos = [tokenizer.eos_token_id] if cfg.add_eos else []
    for ids in tokenizer(batch[cfg.text_field])["input_ids"]:
        ids = np.array(ids + eos)
        for start in range(0, len(ids), cfg.seq_len):
            window = ids[start : start + cfg.seq_len]
            yield window, np.ones(len(window), dtype=bool)


def _prompted_documents(batch: dict, cfg: DataConfig, tokenizer):
    """Chat and instruction records: only the response (assistant) tokens are targets."""
    if cfg.kind == "chat":
        rendered = [_chat_spans(tokenizer, messages) for messages in batch[cfg.messages_field]]
    else:
        pairs = zip(batch[cfg.prompt_field], batch[cfg.response_field])
        if tokenizer.chat_template:
            chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in pairs]
            rendered = [_chat_spans(tokenizer, messages) for messages in chats]
        else:
            rendered = [(p + r, [(len(p), len(p + r))]) for p, r in pairs]
    # A chat template writes its own special tokens (bos, end of turn); plain text gets the tokenizer's.
    plain = cfg.kind == "instruction" and not tokenizer.chat_template
    eos = [tokenizer.eos_token_id] if plain and cfg.add_eos else []
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=plain, return_offsets_mapping=True)
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        starts = np.array([start for start, _ in offsets], dtype=np.int64)
        is_target = np.zeros(len(ids), dtype=bool)
        for begin, end in spans:
            is_target |= (starts >= begin) & (starts < end)
        yield np.array(ids + eos), np.append(is_target, [True] * len(eos))


def _chat_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply.

    A reply's span runs from the end of the prefix rendered with the generation prompt to the end
    of the prefix that includes the reply, cut after its last eos: what a template writes after the
    end-of-turn token (ChatML's newline) is never generated.
    """

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    text, spans = render(len(messages)), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(i, generation_prompt=True), render(i + 1)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise ConfigError(
                "the tokenizer's chat_template renders a conversation differently from its prefixes, "
                "so assistant turns cannot be located: use another template or data.kind=text"
            )
        end = len(upto)
        if tokenizer.eos_token and (cut := upto.rfind(tokenizer.eos_token, len(prompt))) >= 0:
            end = cut + len(tokenizer.eos_token)
        spans.append((len(prompt), end))
    return text, spans


def _rows(docs: Dataset, cfg: DataConfig, tokenizer, path: Path) -> Dataset:
    """Documents laid out in rows of ``seq_len``: greedily packed in order, or one per row."""
    lengths = pc.list_value_length(docs.data.column("input_ids")).to_pylist()
    starts, filled = [], cfg.seq_len  # a full "previous row" makes the first document open a row
    for i, length in enumerate(lengths):
        if not cfg.pack or filled + length > cfg.seq_len:
            starts.append(i)
            filled = 0
        filled += length
    bounds = np.array(starts + [len(lengths)], dtype=np.int64)
    plan = Dataset.from_dict({"first": bounds[:-1], "stop": bounds[1:]})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    features = Features({name: Sequence(Value("int32"), length=cfg.seq_len) for name in ROW_COLUMNS})
    return _cached_map(plan, _fill_rows, path, features, 1024, docs=docs, seq_len=cfg.seq_len, pad_id=pad_id)


def _fill_rows(plan: dict, docs: Dataset, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows for a batch of the plan: row r holds documents ``first[r]:stop[r]``, then padding.

    The padding of a row is one more document (the next id, positions from 0) with label -100.
    """
    first, stop = np.asarray(plan["first"]), np.asarray(plan["stop"])
    table = docs.with_format("arrow")[int(first[0]) : int(stop[-1])]  # this batch's documents, contiguous
    ids = pc.list_flatten(table["input_ids"]).to_numpy()
    labels = pc.list_flatten(table["labels"]).to_numpy()
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    docs_per_row, row_first_doc = stop - first, first - first[0]
    doc_start = np.cumsum(lengths) - lengths  # token offsets in this batch's token stream
    token_doc = np.repeat(np.arange(len(lengths)), lengths)
    token_row = np.repeat(np.arange(len(first)), docs_per_row)[token_doc]
    token_col = np.arange(len(ids)) - doc_start[row_first_doc][token_row]
    used = np.bincount(token_row, minlength=len(first))
    shape = (len(first), seq_len)
    rows = {
        "input_ids": np.full(shape, pad_id),
        "labels": np.full(shape, -100),
        "position_ids": np.arange(seq_len) - used[:, None],  # right for the padding, overwritten before it
        "document_ids": np.repeat(docs_per_row[:, None], seq_len, axis=1),
    }
    rows["input_ids"][token_row, token_col] = ids
    rows["labels"][token_row, token_col] = labels
    rows["position_ids"][token_row, token_col] = np.arange(len(ids)) - doc_start[token_doc]
    rows["document_ids"][token_row, token_col] = token_doc - row_first_doc[token_row]
    return rows
