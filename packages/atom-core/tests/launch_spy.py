"""Recording a Triton kernel's launches in a test: which grid, which arguments, while the real kernel runs."""

from __future__ import annotations

from typing import Any, NamedTuple


class Launch(NamedTuple):
    grid: tuple
    kwargs: dict
    result: Any  # what the launch returned (the compiled kernel)


def spy_launches(monkeypatch, module, name: str) -> list[Launch]:
    """Replace module.<name> (a @triton.jit kernel launched as kernel[grid](...)) for the test's duration by one that
    runs it and appends a Launch to the returned list."""
    kernel, launches = getattr(module, name), []

    class _Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                result = kernel[grid](*args, **kwargs)
                launches.append(Launch(grid, kwargs, result))
                return result
            return launch

    monkeypatch.setattr(module, name, _Spy())
    return launches
