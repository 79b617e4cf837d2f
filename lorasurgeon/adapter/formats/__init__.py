"""Adapter formats: each reads its files into the common ``LoraAdapter`` (and writes it back, where it can).

``registry.ADAPTER_FORMATS`` holds them; ``adapter.weights.load_adapter`` and ``commands._inputs.input_kind``
ask it. Adding a format is one module and one line there (CONTRIBUTING.md, "Adding an adapter format").
"""
