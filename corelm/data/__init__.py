"""Training data: corpus preparation into token shards (prepare.py), shard reading (shards.py),
embedded corpora (corpus.py)."""
