"""The index folder on disk: its layout and manifest, one writer at a time, vectors.h5, kernel.h5 and factors.h5."""
