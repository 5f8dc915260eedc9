"""predictor: the best serving configuration for a trace, learned from twin sweeps."""
