from atom.loader.model_loader import load_config, load_model, resolve_dtype

__all__ = ["load_config", "load_model", "resolve_dtype"]
