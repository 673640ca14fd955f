"""Interchange with other libraries: Hugging Face folders in and out (hf)."""
