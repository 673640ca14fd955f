"""nextlat: Next-Latent Prediction transformers (Teoh et al., arXiv 2511.05963).

The names of the README's Python example load on first use, so ``import nextlat`` and ``import nextlat.config``
stay free of torch.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_components": "nextlat.training.build",
    "decode": "nextlat.decoding.engine",
    "speculative_decode": "nextlat.decoding.engine",
    "build_drafter": "nextlat.registry",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'nextlat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
