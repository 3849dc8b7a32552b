"""Building an index folder: plan and check, write, shards and merge, torchrun, add."""
