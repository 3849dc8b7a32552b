"""Judging an index: the report, the LDS counterfactual benchmark's statistics, figures."""
