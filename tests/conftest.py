import os

# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile caches its generated code here so repeated test runs stay fast.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor_cache"))
