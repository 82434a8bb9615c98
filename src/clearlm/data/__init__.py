"""Data stages: documents in (Dolma fields + licence), tokenizer and token shards out."""
