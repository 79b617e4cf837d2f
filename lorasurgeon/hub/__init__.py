"""The Hugging Face Hub: resolving inputs (``source``), pushing results (``push``), model cards (``cards``)."""
