"""The Hugging Face Hub: resolving inputs (``source``), a dataset's split (``dataset``), pushing results (``push``),
model cards (``cards``)."""
