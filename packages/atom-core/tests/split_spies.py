"""Recording the split-K hand-offs of a model's forward in a test (atom.layers.fp8_input's SplitKPartials): which
partials the RMSNorms added themselves, and where qkv_proj's went (the attention kernel's decode prep, or the sum
kernel first)."""

from __future__ import annotations


def spy_norm_hand_offs(monkeypatch) -> list[tuple]:
    """The shapes [splits, rows, columns] of the partials RMSNorm.forward takes, in call order, for the test's duration."""
    from atom.layers.fp8_input import SplitKPartials
    from atom.layers.norm import RMSNorm

    handed, inner = [], RMSNorm.forward

    def spy(self, x, residual=None):
        if isinstance(x, SplitKPartials):
            handed.append(tuple(x.parts.shape))
        return inner(self, x, residual)

    monkeypatch.setattr(RMSNorm, "forward", spy)
    return handed


def spy_attention_hand_offs(monkeypatch) -> tuple[list[bool], list[tuple]]:
    """(whether each PagedAttention.forward_with_prep call got qkv partials, the shapes of the partials added by
    SplitKPartials.summed) for the test's duration."""
    from atom.layers.attention import PagedAttention
    from atom.layers.fp8_input import SplitKPartials

    prepped, summed = [], []
    inner_prep, inner_sum = PagedAttention.forward_with_prep, SplitKPartials.summed

    def spy_prep(self, *args, qkv_parts=None):
        prepped.append(qkv_parts is not None)
        return inner_prep(self, *args, qkv_parts=qkv_parts)

    def spy_sum(self):
        summed.append(tuple(self.parts.shape))
        return inner_sum(self)

    monkeypatch.setattr(PagedAttention, "forward_with_prep", spy_prep)
    monkeypatch.setattr(SplitKPartials, "summed", spy_sum)
    return prepped, summed


def spy_activation_hand_offs(monkeypatch) -> list[tuple]:
    """The shapes [splits, rows, columns] of the partials GatedActivation.forward takes, in call order, for the
    test's duration."""
    from atom.layers.activation import GatedActivation
    from atom.layers.fp8_input import SplitKPartials

    handed, inner = [], GatedActivation.forward

    def spy(self, x):
        if isinstance(x, SplitKPartials):
            handed.append(tuple(x.parts.shape))
        return inner(self, x)

    monkeypatch.setattr(GatedActivation, "forward", spy)
    return handed
