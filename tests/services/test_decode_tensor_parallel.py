"""The decode service with its model sharded over 2 ranks started by torchrun (gloo on the CPU).

`torchrun --nproc-per-node 2 -m services.decode` over the tiny artifact with `tensor_parallel: 2`: rank 0
serves gRPC, rank 1 follows its steps. Its greedy tokens for two prompts decoded together equal a
single-process engine's; Stats reports the model; SIGTERM (torchrun passes it on, then exits by raising
its own SignalException) drains rank 0, which then stops rank 1: its log says so, and no rank failed.
A node with `tensor_parallel: 2` started as one process refuses to start and says how to launch it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import yaml

from protos.edge.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.sampling import SamplingParams
from services.launcher import free_port, wait_serving

RUNTIME = dict(backend="torch", device="cpu", max_batch_size=2, block_size=4, kv_cache_bytes=2**20)
PROMPTS = ["Hello there", "The quick brown fox jumps"]


def write_node(path, artifact, address: str, **runtime) -> str:
    node = dict(artifact=str(artifact), model="tiny", log_level="INFO", runtime={**RUNTIME, **runtime})
    node["decode"] = dict(address=address, drain_seconds=5)
    path.write_text(yaml.safe_dump(node))
    return str(path)


def generate(address: str, ids: list[int], max_tokens: int) -> list[int]:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    with grpc.insecure_channel(address) as channel:
        events = decode_pb2_grpc.DecodeStub(channel).Generate(
            decode_pb2.DecodeRequest(prompt_token_ids=ids, sampling=sampling), timeout=120
        )
        return [e.token_id for e in events if e.HasField("token_id")]


def test_torchrun_sharded_decode_gives_single_process_tokens(tmp_path, tiny_artifact):
    single = Engine.from_artifact(tiny_artifact, RuntimeConfig(**RUNTIME), verify=False)
    prompts = [single.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [[e.token_id for e in single.generate(ids, params)] for ids in prompts]

    address = f"127.0.0.1:{free_port()}"
    config = write_node(tmp_path / "node.yaml", tiny_artifact, address, tensor_parallel=2, allreduce_chunks=2)
    log_path = tmp_path / "decode.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["-m", "services.decode", "--config", config]
    with log_path.open("wb") as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        group = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_serving(address, 180, group)
        with ThreadPoolExecutor(2) as pool:  # both in flight: decoded in the same steps
            got = list(pool.map(lambda ids: generate(address, ids, 10), prompts))
        assert got == expected
        with grpc.insecure_channel(address) as channel:
            stats = decode_pb2_grpc.DecodeStub(channel).Stats(decode_pb2.StatsRequest(), timeout=30)
        assert stats.model == "tiny" and stats.attention_kernel == "torch"
        group.send_signal(signal.SIGTERM)
        group.wait(60)
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
            group.wait()
    log_text = log_path.read_text()
    assert "rank 0 stopped the group after" in log_text, log_text[-3000:]
    assert '"level": "ERROR"' not in log_text and "ChildFailedError" not in log_text, log_text[-3000:]


def test_tensor_parallel_node_started_as_one_process_says_how_to_launch(tmp_path, tiny_artifact):
    config = write_node(tmp_path / "node.yaml", tiny_artifact, f"127.0.0.1:{free_port()}", tensor_parallel=2)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    done = subprocess.run(
        [sys.executable, "-m", "services.decode", "--config", config], capture_output=True, text=True,
        env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "torchrun --nproc-per-node 2 -m services.decode" in done.stderr
