"""Post-training: conversations, the chat template, SFT, preference optimisation, RL with
verifiable rewards, distillation and merging, on the pretraining engine and run directories."""
