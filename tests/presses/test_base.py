"""Wrapper presses hand on every trait of the press they wrap."""

from __future__ import annotations

import pytest

import curdkv
from curdkv import AdaKVPress


class _ProbePress(curdkv.presses.window.WindowPress):
    """A press whose every trait differs from Press's defaults."""

    needs_full_prefill = True
    scores_depend_on_ratio = True
    calibrates = True
    scores_comparable_across_heads = True

    @property
    def protected_sinks(self) -> int:
        return 3

    @property
    def lookahead_tokens(self) -> int:
        return 5

    def layer_keep(self, seq_len, layer_idx, num_layers):
        return 7 + layer_idx + int(10 * self.compression_ratio)

    def layer_keeps(self, scores, seq_len):
        return [11 + int(10 * self.compression_ratio)] * len(scores)


@pytest.mark.parametrize("wrap", [lambda p: AdaKVPress(p, alpha=0.3), lambda p: curdkv.ChunkKVPress(0.5, press=p)],
                         ids=["AdaKVPress", "ChunkKV"])
def test_every_wrapper_hands_on_every_trait_it_does_not_set_itself(wrap):
    from curdkv.presses.base import TRAITS, WrapperPress

    inner = _ProbePress(compression_ratio=0.5, window_size=9)
    wrapper = wrap(inner)
    assert isinstance(wrapper, WrapperPress)
    assert set(wrapper.own_traits) <= set(TRAITS)
    for trait in TRAITS:
        if trait in wrapper.own_traits:
            assert trait in vars(type(wrapper)), f"{type(wrapper).__name__} sets {trait} but does not define it"
        else:
            assert getattr(wrapper, trait) == getattr(inner, trait), trait
    assert wrapper.protected_recent == 9 and wrapper.query_window == 9 and wrapper.lookahead_tokens == 5
    # Budgets come from the wrapped press at the wrapper's ratio.
    assert wrapper.layer_keep(100, 2, 4) == inner.layer_keep(100, 2, 4) == 14
    assert wrapper.layer_keeps([None] * 3, 100) == [16] * 3


def test_every_press_class_is_exported_from_curdkv():
    import importlib
    import pkgutil

    import curdkv.presses

    defined = set()
    for info in pkgutil.iter_modules(curdkv.presses.__path__):
        module = importlib.import_module(f"curdkv.presses.{info.name}")
        defined |= {c for c in vars(module).values() if isinstance(c, type) and issubclass(c, curdkv.Press)
                    and c.__module__ == module.__name__}
    assert len(defined) >= 18
    missing = sorted(c.__name__ for c in defined if getattr(curdkv, c.__name__, None) is not c
                     or c.__name__ not in curdkv.__all__)
    assert not missing, f"presses not exported from curdkv: {missing}"
