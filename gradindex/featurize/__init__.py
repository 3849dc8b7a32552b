"""Per-sample loss gradients at the spec's draws, aggregated (TracIn / ReTrac) and projected to index rows."""
