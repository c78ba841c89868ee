def save_quantized(*a, **k): raise NotImplementedError
def load_quantized(*a, **k): raise NotImplementedError
def save_adapter(*a, **k): raise NotImplementedError
def load_adapter(*a, **k): raise NotImplementedError
