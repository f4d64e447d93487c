"""Pending prompts through the model: the generation job, GPU locks, and shards across hosts."""
