"""Quantized checkpoint formats. Today: recognising them (``detect``), so that no command computes on
stored codes as if they were weights. Reading and writing them is issue #15's work, one module per format."""
