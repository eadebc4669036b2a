from atom.loader.model_loader import load_config, load_model, resolve_dtype
from atom.loader.parallel_check import check_tensor_parallel

__all__ = ["check_tensor_parallel", "load_config", "load_model", "resolve_dtype"]
