"""Cython hot paths: request parser, ring-buffer FIFO, journal codec and mmap'd append."""
