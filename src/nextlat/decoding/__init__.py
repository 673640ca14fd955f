"""Decoding: sampling (one ``Sampling`` API), reference generation, the KV-cached engine, its drafters and stats."""
