"""Prompt datasets: the built-in tasks (``lambdapo.tasks.TASKS``), reasoning-gym tasks
(``reasoning_gym:<task>``), JSONL/JSON/Parquet files, and Hugging Face datasets (by local
folder or name, when ``datasets`` is installed and the data is cached or reachable). Every
row becomes ``{"prompt", "answer", "solution", **other columns}`` with the configured field
names mapped; a malformed row is an error naming the file and row."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from .config import DataConfig
from .tasks import TASKS, reasoning_gym_source


class DataError(ValueError):
    """A dataset that cannot be used as configured (names the source and row)."""


def _read_rows(source: str, split: str) -> tuple[list[dict], str]:
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        text = path.read_text()
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
            return rows, str(path)
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {number} is not valid JSON ({exc.msg})") from None
        return rows, str(path)
    if path.suffix == ".parquet" and path.is_file():
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
        return pq.read_table(path).to_pylist(), str(path)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        raise DataError(f"data file {path} does not exist")
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"dataset {source!r} is neither a .jsonl/.json/.parquet file nor "
                        f"loadable: Hugging Face datasets need `pip install datasets`") from exc
    try:
        saved = path.is_dir() and any((path / name).exists()
                                      for name in ("dataset_dict.json", "dataset_info.json"))
        loaded = datasets.load_from_disk(source) if saved else datasets.load_dataset(source)
    except Exception as exc:  # noqa: BLE001 - surface the library's own message
        raise DataError(f"dataset {source!r}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset {source!r} has no split {split!r} (has {list(loaded)})")
        loaded = loaded[split]
    return loaded.to_list(), f"{source}[{split}]"


def normalize_rows(rows: list[Any], where: str, config: DataConfig) -> list[dict]:
    """Maps the configured fields to prompt/answer/solution; checks every row."""
    pattern = re.compile(config.answer_pattern, re.S) if config.answer_pattern else None
    out = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {number} is a {type(row).__name__}, not an object")
        fields = {"prompt": config.prompt_field, "answer": config.answer_field}
        if config.solution_field:
            fields["solution"] = config.solution_field
        item = dict(row)
        for key, name in fields.items():
            if name not in row:
                raise DataError(f"{where}: row {number} has no field {name!r} (the "
                                f"{key} field; it has {sorted(row)})")
            value = row[name]
            if key == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise DataError(f"{where}: row {number} field {name!r} must be a string, got "
                                f"{type(value).__name__}")
            item[key] = value
        if pattern is not None:
            match = pattern.search(item["answer"])
            if match is None:
                raise DataError(f"{where}: row {number} answer {item['answer'][-60:]!r} does "
                                f"not match data.answer_pattern {config.answer_pattern!r}")
            item["answer"] = (match.group(1) if match.groups() else match.group(0)).strip()
        try:
            item["prompt"] = config.prompt_template.format(**item)
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"{where}: row {number}: data.prompt_template "
                            f"{config.prompt_template!r} cannot be filled ({exc})") from None
        item.setdefault("solution", "")
        out.append(item)
    if not out:
        raise DataError(f"{where}: no rows")
    return out


def load_split(config: DataConfig, which: str, seed: int) -> list[dict]:
    """Rows of the train (``which="train"``) or held-out (``"eval"``) data."""
    source = config.dataset if which == "train" else (config.eval_dataset or config.dataset)
    if source in TASKS:
        count = config.num_train if which == "train" else config.num_eval
        rows = TASKS[source].generate(which, count, seed=seed)
        return normalize_rows(rows, f"{source}[{which}]", _builtin_fields(config))
    if source.startswith(reasoning_gym_source.PREFIX):
        count = config.num_train if which == "train" else config.num_eval
        try:
            rows = reasoning_gym_source.generate(
                source.removeprefix(reasoning_gym_source.PREFIX), which, count, seed=seed,
                num_train=config.num_train if config.dataset == source else 0)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        return normalize_rows(rows, f"{source}[{which}]", _builtin_fields(config))
    if which == "eval" and not config.eval_dataset and Path(source).is_file():
        raise DataError(f"data.eval_dataset is needed for held-out accuracy with a data file "
                        f"({source})")
    split = config.train_split if which == "train" else config.eval_split
    rows, where = _read_rows(source, split)
    rows = normalize_rows(rows, where, config)
    return rows[:config.num_eval] if which == "eval" else rows


def _builtin_fields(config: DataConfig) -> DataConfig:
    # The built-in tasks have their own column names; only the template applies.
    return DataConfig(prompt_template=config.prompt_template)


class PromptSampler:
    """Epochs over the rows in a seeded order; its position is part of a checkpoint."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows = rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[dict]:
        batch = []
        while len(batch) < count:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.rows[self._order[self.position]])
            self.position += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)


class PromptEncoder:
    """Token ids of prompts and reference solutions, each distinct text tokenized once.

    Prompts go through the tokenizer's chat template when ``data.chat_template`` asks for
    it (``auto``: when the tokenizer has one); reference solutions are tokenized plainly
    (no special tokens), as semantic density compares them with the responses' ids."""

    def __init__(self, tokenizer, config: DataConfig):
        self.tokenizer = tokenizer
        self.config = config
        self._prompts: dict[str, list[int]] = {}
        self._solutions: dict[str, list[int]] = {}

    def uses_chat_template(self) -> bool:
        """Raises ValueError when ``data.chat_template=on`` and the tokenizer has none."""
        mode = self.config.chat_template
        has = getattr(self.tokenizer, "chat_template", None) is not None
        if mode == "on" and not has:
            raise ValueError("data.chat_template=on but the tokenizer has no chat template")
        return mode == "on" or (mode == "auto" and has)

    def prompt_ids(self, row: dict) -> list[int]:
        """The prompt of ``row`` as token ids.

        Raises:
            ValueError: longer than ``data.max_prompt_tokens`` (names the prompt).
        """
        text = row["prompt"]
        if text not in self._prompts:
            if self.uses_chat_template():
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True,
                    tokenize=True)
                # transformers 5 returns a BatchEncoding, 4.x a list of ids.
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(ids) > self.config.max_prompt_tokens:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds data.max_prompt_tokens="
                                 f"{self.config.max_prompt_tokens}: {text[:80]!r}")
            self._prompts[text] = ids
        return self._prompts[text]

    def solution_ids(self, text: str) -> list[int]:
        if text not in self._solutions:
            self._solutions[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._solutions[text]

    def columns(self, rows: list[dict], n: int) -> dict[str, list]:
        """The reward functions' keyword columns for ``n`` samples of each row: every column
        of the rows repeated, plus ``solution_ids`` and ``group_index`` (the row's number)."""
        columns = {key: [row[key] for row in rows for _ in range(n)] for key in rows[0]}
        solution_ids = [self.solution_ids(row["solution"]) for row in rows]
        columns["solution_ids"] = [ids for ids in solution_ids for _ in range(n)]
        columns["group_index"] = [p for p in range(len(rows)) for _ in range(n)]
        return columns
