#!/usr/bin/env bash
# The main job, capture-free: synthesise a paper-style LoRA workload, replay it on the
# twin (an H100 running Llama-3.1-8B, as calibrated from the paper's measurements),
# print the summary and write plots. Run through `make demo` (which sets up .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
mkdir -p "$OUT"

# 64 adapters, per-adapter Poisson rates 0.4/0.2/0.1 req/s, ranks 8/16, 10 minutes,
# ShareGPT V3 prompt/output lengths.
tracekit synth --adapters 64 --rates 0.4,0.2,0.1 --ranks 8,16 --window 600 \
  --lengths sharegpt --seed 0 --out "$OUT/trace.parquet"
tracekit inspect "$OUT/trace.parquet"

# The twin with all 64 adapters served (--max-cpu-loras) and 16 GPU adapter slots (--max-loras).
replay run "$OUT/trace.parquet" --target twin --profile h100-llama-3.1-8b \
  --max-loras 16 --max-cpu-loras 64 --max-num-seqs 2048 --max-num-batched-tokens 2048 \
  --out "$OUT/results.parquet"
replay report "$OUT/results.parquet" --plots "$OUT"

echo
echo "Files written under $OUT/:"
ls -1 "$OUT" | sed 's/^/  /'
echo
echo "Next, your own requests (README, 'Your own requests'): a CSV, Parquet or JSONL log in,"
echo "  .venv/bin/tracekit import table examples/my_requests.csv --map arrival_s=timestamp,adapter=model,..."
echo "  .venv/bin/twin run mine.parquet --profile h100-llama-3.1-8b --max-loras 8 --out mine-twin.parquet"
