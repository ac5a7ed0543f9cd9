"""Test support shared by tests/ and bench/: the tiny Qwen3 builder, the model card's reference code,
where ../shared is, the sample corpus, and real servers to run against. Never imported by product code."""
