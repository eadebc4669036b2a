from atom.models import mixtral
from atom_sglang.model_base import SGLangModelMixin


class MixtralForCausalLM(SGLangModelMixin, mixtral.MixtralForCausalLM):
    pass


EntryClass = MixtralForCausalLM
