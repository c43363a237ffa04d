"""What the vLLM engine of an infer agent asks of vLLM, without starting it: the server's command line sized from
the settings (LoRA, tensor parallelism on GPUs, the KV cache on a CPU), an environment without the agent's
secrets, the completion request for the control plane's tokens and parameters, vLLM's logprobs turned into the
native engine's entries, adapters vLLM cannot serve refused with a reason before it is asked, and the marker
that says vLLM's own environment is complete; what vLLM streamed while the agent was busy goes out as one delta.
(tests/e2e/test_vllm_agent.py runs the real thing.)"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from adaptery.agent import vllm_env
from adaptery.agent.vllm_engine import (
    _END,
    ServerOptions,
    VllmEngine,
    VllmUnavailable,
    _Served,
    check_lora,
    completion_body,
    error_message,
    logprob_entries,
    lora_rank,
)
from adaptery.cli.main import app
from adaptery.engine.generation import AdapterRejected, Delta, EngineUnavailable, Usage
from adaptery.engine.sampling import Constraint, SamplingParams


def options(gpus: int = 0, **changes) -> ServerOptions:
    values = dict(
        python=Path("/env/bin/python"),
        max_loras=4,
        max_cpu_loras=32,
        max_lora_rank=64,
        max_num_seqs=16,
        dtype="float32",
        gpus=gpus,
        tensor_parallel_size=max(gpus, 1),
        kv_cache_bytes=512 * 1024 * 1024,
        gpu_memory_utilization=0.45,
        threads=None,
        start_timeout=60,
    )
    return ServerOptions(**{**values, **changes})


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_lora_ranks_round_up_to_one_vllm_builds():
    assert [lora_rank(r) for r in (1, 2, 8, 9, 64, 65, 300, 512)] == [1, 8, 8, 16, 64, 128, 320, 512]
    with pytest.raises(ValueError, match="up to 512"):
        lora_rank(513)


def test_the_server_command_enables_lora_sized_from_the_settings_on_a_private_socket():
    command = options().command("adaptery-demo", "/models/demo", Path("/run/x/vllm.sock"))
    assert command[:3] == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(command, "--model") == "/models/demo" and flag(command, "--served-model-name") == "adaptery-demo"
    assert "--enable-lora" in command
    assert (flag(command, "--max-loras"), flag(command, "--max-cpu-loras"), flag(command, "--max-lora-rank")) == (
        "4",
        "32",
        "64",
    )
    assert flag(command, "--uds") == "/run/x/vllm.sock" and "--port" not in command and "--host" not in command
    assert flag(command, "--kv-cache-memory-bytes") == str(512 * 1024 * 1024)  # a CPU: the KV cache's budget
    assert "--tensor-parallel-size" not in command and "--gpu-memory-utilization" not in command


def test_on_gpus_the_base_is_split_across_all_of_them():
    command = options(gpus=4, extra_args=("--enforce-eager",)).command("b", "/m", Path("/s"))
    assert flag(command, "--tensor-parallel-size") == "4" and flag(command, "--gpu-memory-utilization") == "0.45"
    assert "--kv-cache-memory-bytes" not in command and command[-1] == "--enforce-eager"


def test_vllm_gets_no_adaptery_secret_and_allows_runtime_lora_loading(monkeypatch):
    monkeypatch.setenv("ADAPTERY_AGENT_CREDENTIALS", "agent-x:secret")
    monkeypatch.setenv("PYTHONPATH", "/work")
    env = options(threads=1).environment("key-1")
    assert not any(name.startswith("ADAPTERY_") for name in env) and "PYTHONPATH" not in env
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_API_KEY"] == "key-1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "1"


def test_a_cpu_agent_given_a_share_of_the_cores_leaves_vllms_threads_unbound(monkeypatch):
    """vLLM's automatic binding pinned its one worker thread to core 0, beside the agent, the bus and the platform;
    an operator's own binding, a GPU machine and an agent given every core keep vLLM's choice."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert options(threads=1).environment("k")["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in options(threads=None).environment("k")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in options(threads=1, gpus=1).environment("k")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3")
    assert options(threads=4).environment("k")["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"


def test_the_completion_request_carries_the_control_planes_tokens_and_parameters():
    params = SamplingParams(
        max_tokens=7, temperature=0.0, top_p=0.9, top_k=5, stop=["\n"], seed=3, logit_bias={9: -100}
    )
    body = completion_body("a" * 64, [0, 5, 9], params)
    assert body["logit_bias"] == {"9": -100.0}  # OpenAI's shape: token ids as strings
    assert body["model"] == "a" * 64 and body["prompt"] == [0, 5, 9]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == (7, 0.0, 0.9, 5)
    assert body["stop"] == ["\n"] and body["seed"] == 3
    assert body["stream"] is True and body["return_token_ids"] is True  # tokens per chunk: the host bills them
    assert "logprobs" not in body and "structured_outputs" not in body and "stream_interval" not in body
    # an answer the client reads whole: the first token at once (progress for the control plane), then the rest in
    # one piece rather than a chunk a token
    assert completion_body("m", [1], params, streamed=False)["stream_interval"] == 7
    with_logprobs = completion_body("m", [1], SamplingParams(logprobs=True, top_logprobs=2))
    assert with_logprobs["logprobs"] == 2 and with_logprobs["return_tokens_as_token_ids"] is True
    grammar = 'start: "yes" | "no"'
    constrained = completion_body("m", [1], SamplingParams(constraint=Constraint(grammar)))
    assert constrained["structured_outputs"] == {"grammar": grammar}
    # over the wire the constraint is a plain dict (SamplingParams(**request.params))
    assert completion_body("m", [1], SamplingParams(constraint={"grammar": grammar}))["structured_outputs"] == {
        "grammar": grammar
    }


def test_vllms_logprobs_become_the_native_engines_entries(demo_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    a, b, c = 40, 41, 42
    logprobs = {
        "tokens": [f"token_id:{a}", f"token_id:{b}"],
        "token_logprobs": [-0.5, -1.5],
        "top_logprobs": [
            {f"token_id:{c}": -2.0, f"token_id:{a}": -0.5, f"token_id:{b}": -1.0},
            {f"token_id:{b}": -1.5},
        ],
    }
    entries = logprob_entries(tokenizer, logprobs, top=2)
    text = tokenizer.decode([a])
    assert entries[0] == {
        "token": text,
        "logprob": -0.5,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": text, "logprob": -0.5, "bytes": list(text.encode())},
            {"token": tokenizer.decode([b]), "logprob": -1.0, "bytes": list(tokenizer.decode([b]).encode())},
        ],  # best first, cut to top
    }
    assert entries[1]["token"] == tokenizer.decode([b]) and len(entries[1]["top_logprobs"]) == 1
    assert logprob_entries(tokenizer, logprobs, top=0)[0]["top_logprobs"] == []
    assert logprob_entries(tokenizer, None, top=2) == []


def adapter_dir(tmp_path: Path, **config) -> Path:
    path = tmp_path / "adapter"
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **config}))
    return path


def test_adapters_vllm_cannot_serve_are_refused_with_the_reason(tmp_path):
    check_lora(adapter_dir(tmp_path), max_rank=64)
    check_lora(adapter_dir(tmp_path, use_rslora=True), max_rank=64)
    with pytest.raises(AdapterRejected, match="DoRA"):
        check_lora(adapter_dir(tmp_path, use_dora=True), max_rank=64)
    with pytest.raises(AdapterRejected, match="LoRA adapters only; this one is LOHA"):
        check_lora(adapter_dir(tmp_path, peft_type="LOHA"), max_rank=64)
    with pytest.raises(AdapterRejected, match="rank 128 is above this server's maximum 64"):
        check_lora(adapter_dir(tmp_path, rank_pattern={"q_proj": 128}), max_rank=64)
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterRejected, match="cannot be read"):
        check_lora(tmp_path / "adapter", max_rank=64)


def test_vllms_error_text_is_passed_on():
    new = httpx.Response(400, json={"error": {"message": "max_tokens is too large", "type": "BadRequestError"}})
    old = httpx.Response(404, json={"object": "error", "message": "The model `x` does not exist."})
    assert error_message(new) == "max_tokens is too large"
    assert error_message(old) == "The model `x` does not exist."
    assert error_message(httpx.Response(500, text="Internal Server Error")) == "Internal Server Error"


def test_the_environment_is_ready_only_when_its_marker_names_what_this_machine_needs(tmp_path):
    env = tmp_path / "vllm-env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    assert not vllm_env.is_ready(env, gpus=0)  # no marker: an install that did not finish
    (env / vllm_env.MARKER).write_text(" ".join(vllm_env.CPU_PACKAGES) + "\n")
    assert vllm_env.is_ready(env, gpus=0)
    assert not vllm_env.is_ready(env, gpus=2)  # a CPU build on a GPU machine is rebuilt with CUDA's vllm
    assert vllm_env.packages(0)[0] == "torch==2.13.0"  # first, so pip takes the local CPU build
    assert vllm_env.packages(1) == (f"vllm=={vllm_env.VLLM_VERSION}",)


def test_an_unknown_engine_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["agent", "--engine", "tgi", "--data-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "Unknown engine 'tgi'" in result.output


def test_each_server_gets_a_private_socket_directory_and_a_key_of_its_own(tmp_path):
    from adaptery.agent.vllm_engine import VllmServer

    first, second = (VllmServer("b", "/m", options(), tmp_path) for _ in range(2))
    try:
        assert first.socket.parent.stat().st_mode & 0o777 == 0o700
        assert first.socket.parent != second.socket.parent and first.api_key != second.api_key
        assert len(first.api_key) >= 40 and first.headers == {"Authorization": f"Bearer {first.api_key}"}
    finally:
        first.stop()
        second.stop()
    assert not first.socket.parent.exists()


EOS = 2


def streamed(tmp_path: Path, chunks: list, params: SamplingParams | None = None) -> tuple[list[Delta], Usage, list]:
    """The deltas the engine makes of vLLM's stream `chunks` (a list, or an exception the stream raised), taken
    only once all of them have arrived, as when the agent's thread fell behind."""
    import threading

    engine = VllmEngine(options(), tmp_path, max_adapters=1)
    all_in = threading.Event()

    async def stream(served, body, queue) -> None:
        for chunk in chunks:
            queue.put(chunk)
        all_in.set()

    engine._stream = stream
    served = _Served("ref", None, None, None, {EOS})
    usage, got = Usage(), []
    try:
        for delta in engine._deltas(
            served, {}, params or SamplingParams(max_tokens=16), usage, lambda: not all_in.wait(10)
        ):
            got.append(delta)
    except Exception as exc:  # noqa: BLE001 - returned for the test to look at
        return got, usage, [exc]
    finally:
        engine.stop()
    return got, usage, []


def chunk(text: str, ids: list[int], finish: str | None = None) -> dict:
    return {"choices": [{"text": text, "token_ids": ids, "finish_reason": finish, "stop_reason": None}]}


def test_what_vllm_streamed_meanwhile_goes_out_as_one_delta_with_the_end(tmp_path):
    chunks = [chunk("a", [5]), chunk("", [6]), chunk("bc", [7]), chunk("d", [8, EOS], "stop"), _END]
    deltas, usage, errors = streamed(tmp_path, chunks)
    assert errors == [] and deltas == [Delta("abcd", "stop")]  # one message to the control plane, not five
    assert usage.completion_tokens == 4  # the end of text is not counted, as the native engine does not


def test_a_server_lost_mid_answer_delivers_what_came_and_fails_as_unavailable(tmp_path):
    lost = VllmUnavailable("vLLM's server for adaptery-demo was lost")
    deltas, usage, errors = streamed(tmp_path, [chunk("a", [5]), chunk("b", [6]), lost])
    assert deltas == [Delta("ab")] and usage.completion_tokens == 2
    assert errors == [lost] and isinstance(lost, EngineUnavailable)  # the host says retryable only before a token


def test_a_stream_that_ends_without_a_finish_reason_fails(tmp_path):
    deltas, _, errors = streamed(tmp_path, [chunk("a", [5]), _END])
    assert deltas == [Delta("a")] and "without finishing it" in str(errors[0])
