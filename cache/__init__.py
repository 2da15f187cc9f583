"""The fragment cache: model weights as content-addressed fragments in tiers (RAM <- disk <- origin),
indexed in Redis so every worker and node knows who holds what."""
