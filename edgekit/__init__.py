"""edgekit: distill, quantize and export language models to phone-ready files."""

__version__ = "0.1.0"
