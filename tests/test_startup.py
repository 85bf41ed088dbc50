"""Start-up: the activation peak the KV budget reserves is bounded from small measurements
instead of a forward of the largest step; it must bound the peak such a forward really has.

Each family's tiny checkpoint (and the default model at a moderate size) runs the real forward
of N tokens (`profile_peak_memory`) and the engine's bound (`activation_peak`): N past the
measured forward (64 tokens) and past the CPU's attention measurement (1,024 queries), so both
extrapolations are exercised. The bound must hold and stay within a small factor (an estimate
that reserved everything would starve the KV cache).
"""

from __future__ import annotations

import pytest

import reference as R

BLOCK_SIZE = 16
MIB = 1 << 20
#: The bound may exceed the measured peak by this factor (plus a MiB of allocator slack: tiny
#: models allocate a few MiB at most). Attention scores count twice in the bound (a second
#: ModelRunner of the same tiny checkpoint in one process measured 1.7x the first's peak), and
#: dominate tiny models' forwards at thousands of tokens.
LOOSENESS = 2.5


def _check(runner, num_tokens: int) -> tuple[int, int]:
    bound = runner.activation_peak(num_tokens)
    measured = runner.profile_peak_memory(num_tokens)
    assert bound >= measured, (
        f"activation bound {bound / MIB:.2f} MiB below the measured peak "
        f"{measured / MIB:.2f} MiB at {num_tokens} tokens"
    )
    assert bound <= LOOSENESS * measured + MIB, (
        f"activation bound {bound / MIB:.2f} MiB is loose: measured {measured / MIB:.2f} MiB "
        f"at {num_tokens} tokens"
    )
    return bound, measured


@pytest.mark.parametrize("family", ["gqa_untied", *R.FAMILY_VARIANTS])
def test_activation_bound_holds_on_tiny_families(core, tiny_models, family):
    runner = core.ModelRunner(str(tiny_models.path(family)), block_size=BLOCK_SIZE, device="cpu")
    for n in (40, 300, 2048, 4096):
        _check(runner, n)


def test_activation_bound_holds_on_default_model(core, default_model_dir):
    runner = core.ModelRunner(str(default_model_dir), block_size=BLOCK_SIZE, device="cpu")
    bound, measured = _check(runner, 512)
    # The default model's attention is a small share at 512 tokens; the bound stays close.
    assert bound <= 1.5 * measured


def test_weight_loading_reports_progress(core, tiny_models):
    calls: list[tuple[int, int]] = []
    runner = core.ModelRunner(
        str(tiny_models.path("sharded")), block_size=BLOCK_SIZE, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[0] == (0, runner.weights_nbytes) and calls[-1] == (runner.weights_nbytes,) * 2
    done = [d for d, _ in calls]
    assert done == sorted(done) and {t for _, t in calls} == {runner.weights_nbytes}

    def fails(done: int, total: int) -> None:
        raise RuntimeError("progress bar broke")

    # A failing callback is logged; the model still loads.
    again = core.ModelRunner(str(tiny_models.path("sharded")), block_size=BLOCK_SIZE, progress=fails)
    assert again.weights_nbytes == runner.weights_nbytes
