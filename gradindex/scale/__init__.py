"""Indexes built by many processes or grown later: shard merge, torchrun builds, add."""
