"""Post-training: preference optimisation, RL with verifiable rewards, distillation."""
"""Post-training: conversations, the chat template, SFT data and losses."""
"""Post-training: steps after pre-training that reuse its engine and run directories."""
