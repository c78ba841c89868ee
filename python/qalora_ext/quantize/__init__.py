"""Quantization methods beyond the round-to-nearest kernel (``ops.quantize_rtn``).

``gptq``         column-wise GPTQ with contiguous groups (SPEC's rounding)
``calibration``  calibration windows from the training text
"""
