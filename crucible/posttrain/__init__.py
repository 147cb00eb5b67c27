"""Post-training: preference optimisation, RL with verifiable rewards, distillation."""
