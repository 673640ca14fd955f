"""Decoding: sampling, reference generation, the KV-cached engine and its drafters."""
