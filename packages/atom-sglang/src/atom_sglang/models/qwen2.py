from atom.models import qwen2
from atom_sglang.model_base import SGLangModelMixin


class Qwen2ForCausalLM(SGLangModelMixin, qwen2.Qwen2ForCausalLM):
    pass


EntryClass = Qwen2ForCausalLM
