"""curdkv.vllm's pieces without an engine: the cache layout, the compaction, the checks of settings."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.config", reason="needs vLLM (make test-vllm)")

import torch  # noqa: E402

import curdkv  # noqa: E402
import curdkv.vllm  # noqa: E402
from engine_setup import model_dir  # noqa: E402,F401 (a fixture)
from curdkv.runtime.layer import select_tokens  # noqa: E402
from curdkv.vllm.compaction import compact_layer
from curdkv.vllm.metadata import CompressOrder  # noqa: E402
from curdkv.vllm.config import CompressionSpec, ModelRope, plain_rope, unsupported_reasons  # noqa: E402
from curdkv.vllm.paged import RegionLayout, slots_of, write_tokens  # noqa: E402


def isa_for(dtype, block_size, head_size):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,head_size", [(32, 64), (128, 64), (64, 128)])
def test_reading_returns_what_vllm_wrote(dtype, block_size, head_size):
    layout = RegionLayout.probe(dtype, block_size, head_size, isa_for(dtype, block_size, head_size))
    layout.check(dtype, isa_for(dtype, block_size, head_size), num_kv_heads=3)


def test_compaction_keeps_the_press_choice_and_moves_the_tail():
    block, heads, dim, context, tail = 32, 3, 64, 150, 7
    isa = isa_for(torch.float32, block, dim)
    layout = RegionLayout.probe(torch.float32, block, dim, isa)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(context + tail, heads, dim, generator=gen)
    values = torch.randn(context + tail, heads, dim, generator=gen)
    cache = torch.zeros(10, heads, block, 2 * dim)
    blocks = [7, 2, 9, 0, 4, 5]
    write_tokens(cache, keys, values, slots_of(blocks, context + tail, block), isa)
    press = curdkv.get_press("curdkv", 0.6)
    kept = press.layer_keep(context, 0, 30)
    order = CompressOrder("r", CompressionSpec("curdkv", 0.6), context, context + tail, kept, tuple(blocks))
    rope = plain_rope(dim)
    chosen = compact_layer(cache, layout, isa, 3, press, order, rope)
    k_all, v_all = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    expected = select_tokens(press, k_all[:, :, :context], v_all[:, :, :context], None, rope, 3, n_keep=kept)[0]
    assert torch.equal(chosen, expected)
    read_keys, read_values = layout.read(cache, blocks, kept + tail)
    for h in range(heads):
        assert torch.equal(read_keys[h, :kept], keys[expected[h], h])
        assert torch.equal(read_values[h, :kept], values[expected[h], h])
        assert torch.equal(read_keys[h, kept:], keys[context:, h])
    assert order.blocks_kept(block) == -(-(kept + tail) // block)


@pytest.mark.parametrize("options,match", [
    (dict(press="no-such-press"), r"\['press'\] must be one of"),
    (dict(compression_ratio=1.0), r"\['compression_ratio'\] must be a float in \[0, 1\)"),
    (dict(compression_ratio=-0.1), r"\['compression_ratio'\] must be a float in \[0, 1\)"),
    (dict(press="h2o"), r"cannot run inside vLLM: it reads the queries of every context token"),
    (dict(press="adacurdkv"), r"head-adaptive"),
    (dict(press="adasnapkv"), r"head-adaptive"),
    (dict(press="pyramidkv"), r"cannot run inside vLLM"),
])
def test_bad_settings_name_the_parameter_and_what_it_may_be(options, match):
    with pytest.raises(ValueError, match=match):
        curdkv.vllm.kv_transfer_config(**options)
    with pytest.raises(ValueError, match=match):
        curdkv.vllm.request_options(**options)


def test_supported_presses_score_from_keys_values_and_a_query_window():
    supported = set(curdkv.vllm.supported_presses())
    assert {"curdkv", "curdkv-sketch", "knorm", "random", "streamingllm"} <= supported
    assert {"snapkv", "chunkkv", "morphkv", "obcache"} <= supported
    assert not {"adasnapkv", "pyramidkv", "h2o", "compactor", "expectedattention"} & supported


def test_window_presses_need_an_eager_engine(model_dir):
    """Compiled once, the model would not run the hook that copies the window's queries again."""
    from curdkv.vllm.connector import CurDKVConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    config = engine_config(model_dir, enforce_eager=False,
                           kv_transfer_config=curdkv.vllm.kv_transfer_config("snapkv", 0.5))
    with pytest.raises(ValueError, match=r"reads the last 64 context queries.*enforce_eager=True"):
        CurDKVConnector(config, KVConnectorRole.SCHEDULER)


def test_presses_that_undo_rope_read_the_served_models_config():
    """CurDKV's default undoes RoPE from the model's config; a model whose RoPE it cannot undo is refused
    with an error that names the press that scores the cached keys instead."""
    from types import SimpleNamespace

    press = curdkv.get_press("curdkv", 0.5)
    assert press.key_space == "pre_rope" and not unsupported_reasons(press, plain_rope(64))
    unknown_rope = ModelRope(SimpleNamespace(head_dim=16, rope_parameters={"rope_type": "no-such", "rope_theta": 1e4}))
    reasons = unsupported_reasons(press, unknown_rope)
    assert len(reasons) == 1 and "rope_type must be one of" in reasons[0] and "curdkv-post-rope" in reasons[0]
    assert not unsupported_reasons(curdkv.get_press("curdkv-post-rope", 0.5), unknown_rope)


def engine_config(model_dir, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=model_dir, dtype="float32", max_model_len=4096, enforce_eager=True,
                enable_prefix_caching=False, kv_transfer_config=curdkv.vllm.kv_transfer_config("curdkv", 0.5))
    return EngineArgs(**{**args, **overrides}).create_engine_config()


def test_engines_curdkv_cannot_serve_are_refused(model_dir):
    from curdkv.vllm.model_check import check_engine

    assert check_engine(engine_config(model_dir), None) == 30
    with pytest.raises(ValueError, match="enable_prefix_caching must be False"):
        check_engine(engine_config(model_dir, enable_prefix_caching=True), None)
    config = engine_config(model_dir)
    config.model_config.hf_text_config.sliding_window = 256
    with pytest.raises(ValueError, match="sliding-window attention"):
        check_engine(config, None)


def test_the_server_command_line_reaches_the_connector(model_dir):
    """`vllm serve DIR --kv-transfer-config '{...}'` parses to the engine settings LLM(...) gets."""
    import json

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = {"kv_connector": "CurDKVConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"press": "curdkv", "compression_ratio": 0.5}}
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model_dir, "--no-enable-prefix-caching", "--kv-transfer-config",
                              json.dumps(settings)])
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert config.kv_transfer_config.kv_connector == "CurDKVConnector"
    assert config.kv_transfer_config.kv_connector_extra_config == settings["kv_connector_extra_config"]
