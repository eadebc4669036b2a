from atom.models import qwen3_moe
from atom_sglang.model_base import SGLangModelMixin


class Qwen3MoeForCausalLM(SGLangModelMixin, qwen3_moe.Qwen3MoeForCausalLM):
    pass


EntryClass = Qwen3MoeForCausalLM
