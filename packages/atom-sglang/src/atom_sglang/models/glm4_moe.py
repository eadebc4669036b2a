from atom.models import glm4_moe
from atom_sglang.model_base import SGLangGlm4MoeBackbone, SGLangModelMixin


class Glm4MoeForCausalLM(SGLangModelMixin, glm4_moe.Glm4MoeForCausalLM):
    backbone_cls = SGLangGlm4MoeBackbone


EntryClass = Glm4MoeForCausalLM
