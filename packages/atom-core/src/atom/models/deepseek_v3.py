"""DeepSeek-V3 / R1: DeepSeek-V2's MLA and DeepSeekMoE blocks with V3's router (sigmoid scores,
e_score_correction_bias, groups scored by their two best experts) and optional neox-ordered rope
(`rope_interleave`, default true). Checkpoints carry one MTP layer (kept, see deepseek_v2.MTPKeepingCausalLM)."""

from atom.models.deepseek_v2 import DeepseekOptions, DeepseekV2ForCausalLM, v3_routing


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @classmethod
    def options(cls, config) -> DeepseekOptions:
        interleaved = getattr(config, "rope_interleave", True)
        return DeepseekOptions(routing=v3_routing(config), rope_interleaved=True if interleaved is None else interleaved)
