"""Dense checkpoints in: a family adapter per architecture (`families`), module surgery on a
transformers model (`surgery`), loading from a path or hub id with its tokenizer (`load`), and
the KV-cache keyword of the installed transformers (`cache`). Nothing here knows MoE."""
