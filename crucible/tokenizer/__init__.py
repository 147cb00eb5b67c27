"""Tokenizer training and loading (byte-level BPE with HF `tokenizers`)."""
