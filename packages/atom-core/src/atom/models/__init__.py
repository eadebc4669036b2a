from atom.models.registry import model_class, model_class_for_config, supported_architectures

__all__ = ["model_class", "model_class_for_config", "supported_architectures"]
