"""Stateless pieces shared by the model families: attention dispatch, RoPE tables, KV cache."""
