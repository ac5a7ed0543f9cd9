"""Winnow ingest: read a corpus, split it into passages, embed them and upsert into Milvus."""
