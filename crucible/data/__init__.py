"""Data path of the pretraining engine: embedded corpus, tokenized shards, deterministic loader."""
