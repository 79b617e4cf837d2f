"""Quantized checkpoint formats: recognising them (``detect``: config.json's quantization block, tensor
names and dtypes), reading and re-quantizing them (one module per format, each exposing one ``Format``
object, listed in ``registry.FORMATS``), and a checkpoint's quantized weights found and read dequantized
(``layout``). What every format shares (``QuantTensor``, ``Codec``, ``Format``, the re-quantization rule)
is in ``base``."""
