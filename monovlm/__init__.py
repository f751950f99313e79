"""monovlm: encoder-free vision-language models — one decoder reads image patches and text tokens."""

__version__ = "0.1.0"
