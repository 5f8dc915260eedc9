"""Capture: what a vLLM server was asked and what its engine did, as Parquet.

Two independent recorders, each readable on its own:

- the proxy (`tracekit proxy`), in front of vLLM's OpenAI API: one results-kind row per
  completion request, whatever happens to it.
  `proxy` (the server: forwarding, hang-ups, the drain at a stop, the command),
  `sse` (reading a stream as it is relayed), `rows` (a request's row, the part writer),
  `prompts` (the prompt's token ids and its `prefix_hashes`, through `/tokenize`).
- the step plugin, loaded by vLLM through entry points, enabled by `TRACEKIT_STEPS_DIR`:
  one steps-schema row per executed engine batch.
  `steps` (the recorder and its writer), `loads` (adapter-load events, attributed to
  steps), `signals` (flushing on a stop signal, holding a late one), `vllm_hooks` (every
  hook into vLLM internals, with the vLLM attributes each depends on), `stat_logger`
  (the fallback from vLLM's iteration stats).

Nothing is imported here: vLLM imports the plugin modules in every process, and the
proxy's command imports only what it needs.
"""
