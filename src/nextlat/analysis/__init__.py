"""Analyses of trained (or imported) models: k-ahead linear probes and the effective rank of hidden states."""
