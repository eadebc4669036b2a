from atom.models import qwen3
from atom_sglang.model_base import SGLangModelMixin


class Qwen3ForCausalLM(SGLangModelMixin, qwen3.Qwen3ForCausalLM):
    pass


EntryClass = Qwen3ForCausalLM
