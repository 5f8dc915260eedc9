"""replay: drive a trace against real vLLM or the twin, report and compare results."""
