"""Storing and searching rows: the index folder, vectors.h5, kernel.h5 and the search backends (FAISS, on-disk IVF, Milvus)."""
