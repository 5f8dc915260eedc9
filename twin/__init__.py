"""twin: a calibrated digital twin of vLLM V1 serving with LoRA adapters."""
