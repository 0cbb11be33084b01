"""GSM8K (question / worked answer ending in ``#### <number>``, as JSON lines or the Hugging
Face dataset ``openai/gsm8k``) -> verl's RL parquet format: a chat prompt, the number as
``reward_model.ground_truth`` and the worked solution as ``extra_info.answer`` (the
semantic-density reference of ``lambdapo.integrations.verl.compute_score``).

    python examples/verl/prepare_gsm8k.py path/to/gsm8k ~/data/gsm8k   # {train,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."


def convert(row: dict, split: str, index: int) -> dict:
    match = re.search(r"####\s*(.+?)\s*$", row["answer"])
    if match is None:
        raise ValueError(f"{split} row {index}: the answer has no '#### <number>' line")
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{row['question']} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": match.group(1).replace(",", "")},
        "extra_info": {"split": split, "index": index, "question": row["question"],
                       "answer": row["answer"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with train.jsonl and test.jsonl")
    parser.add_argument("output", help="folder for train.parquet and test.parquet")
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = (Path(args.source).expanduser() / f"{split}.jsonl").read_text().splitlines()
        rows = [convert(json.loads(line), split, i) for i, line in enumerate(lines) if line]
        pq.write_table(pa.Table.from_pylist(rows), out / f"{split}.parquet")
        print(f"{split}: {len(rows)} rows -> {out / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
