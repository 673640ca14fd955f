"""nextlat: Next-Latent Prediction transformers (Teoh et al., arXiv 2511.05963)."""

__version__ = "0.1.0"
