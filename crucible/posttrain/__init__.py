"""Post-training: conversations, the chat template, SFT data and losses."""
