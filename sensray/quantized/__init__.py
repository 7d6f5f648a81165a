"""Quantized replicas (bitsandbytes int8, nf4, fp4): loading them, and where and how their bits are stored.

    loading.py    ModelSpec -> BitsAndBytesConfig, the quantized meta model, `prepare` after load
    storage.py    which buffers a quantized Linear has, by canonical name (`...weight.scale`, ...)
    elements.py   a canonical tensor's elements: format, logical shape, storage units, decoders

    sensray sweep experiments/bitflip-int8.yaml --executor local
"""
