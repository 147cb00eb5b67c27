"""Post-training: steps after pre-training that reuse its engine and run directories."""
