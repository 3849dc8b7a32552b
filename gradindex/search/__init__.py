"""Searching stored rows: the backend interface, FAISS in RAM and on disk, Milvus, tuning, kernel recall."""
