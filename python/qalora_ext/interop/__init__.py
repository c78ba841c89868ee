"""Other tools' formats, in and out.

``gguf_q4_1``   the GGUF Q4_1 block layout (llama.cpp), read and written
``gguf_export`` a whole llama-family model as a GGUF file
``mlx_export``  an mlx-lm folder
``gptq_import`` AutoGPTQ / GPTQModel checkpoints
``peft_import`` PEFT ``use_qalora`` adapters
"""
