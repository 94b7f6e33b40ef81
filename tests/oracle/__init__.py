"""Test oracles (llama.cpp through ctypes)."""
