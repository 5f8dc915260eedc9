"""replay: drive a trace against real vLLM or the twin, report and compare results.

- `replay.runner`: the open-loop runner (absolute deadlines on a precise clock, optional
  concurrency cap, cut at a window, bounded drain on SIGINT/SIGTERM);
- `replay.vllm_target`: streaming `/v1/completions` requests, adapter resolution and
  loading; `replay.targets`: the `vllm` and `twin` targets behind one interface;
- `replay.report`, `replay.compare`: summaries and comparisons, through
  `tracekit.metrics`, `tracekit.summary` (tables) and `tracekit.plots` (PNGs), which
  `twin run` shares;
- `replay.fast_server`: a streaming OpenAI-compatible server with no model, for tests
  and the fidelity benchmark.

Clock: every time in a results file is seconds since the replay started, and a request's
`arrival_s` is when it was due (the trace's arrival divided by `--speed`). Latencies are
measured from `dispatch_s`, the moment the request was sent.
"""
