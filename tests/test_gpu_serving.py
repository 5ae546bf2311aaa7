"""One GPU for vLLM and the trainer, or one each: the memory share, the devices, sleep mode. vLLM cannot run on a
GPU here, so these check the command lines and environments built for a CPU, one shared GPU (with and without sleep
mode) and two GPUs, and the pure functions behind them."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from lightning_core.common import gpu
from lightning_core.common.gpu import GIB, ModelShape, device_plan, trainer_memory, vllm_memory_share
from lightning_core.common.model import DEFAULT_MODEL_DIR, is_model_dir
from lightning_core.common.services import Service, ServiceError
from lightning_core.config import load_config
from lightning_core.serving import vllm
from lightning_core.serving.vllm import Machine

SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
CPU = Machine(gpus=0, cpu_count=2, cpu_bf16=False)


@pytest.fixture
def model_dir(request) -> Path:
    return DEFAULT_MODEL_DIR if is_model_dir(DEFAULT_MODEL_DIR) else request.getfixturevalue("tiny_model_dir")


def config_for(tmp_path, model_dir, *overrides):
    return load_config(None, overrides=[f"project_dir={tmp_path}", f"serving.vllm_python={sys.executable}",
                                        f"model.path={model_dir}", *overrides])


# --- the pure functions ---------------------------------------------------------------------------------------------

def test_the_shape_counts_smollm2s_parameters_and_its_lora_as_measured():
    shape = ModelShape.from_config(SMOLLM2)
    assert shape.params == 134_515_008  # SmolLM2-135M
    assert gpu.lora_params(shape, r=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]) == 1_843_200  # FACTS: 1.84M


def test_the_trainer_estimate_adds_weights_lora_state_activations_and_logits():
    shape = ModelShape.from_config(SMOLLM2)
    need = trainer_memory(shape, micro_batch_size=2, sequence_length=1024)
    tokens = 2 * 1024
    assert need.weights == 2 * shape.params
    assert need.trainable == 16 * 1_843_200
    assert need.activations == 30 * 2 * (8 * 576 + 4 * 1536) * tokens
    assert need.logits == 8 * tokens * 49152
    assert need.total == need.weights + need.trainable + need.activations + need.logits
    assert trainer_memory(shape, micro_batch_size=4, sequence_length=1024).total > need.total
    checkpointed = trainer_memory(shape, micro_batch_size=2, sequence_length=1024, gradient_checkpointing=True)
    assert checkpointed.activations < need.activations / 5
    full = trainer_memory(shape, micro_batch_size=2, sequence_length=1024, finetune="full")
    assert (full.weights, full.trainable) == (0, 16 * shape.params)


QWEN7B = ModelShape(hidden_size=3584, layers=28, heads=28, kv_heads=4, intermediate_size=18944, vocab_size=152064)


def test_the_logits_term_is_bounded_by_the_chunk():
    everything = trainer_memory(QWEN7B, micro_batch_size=8, sequence_length=2048)
    assert everything.logits == 8 * 8 * 2048 * 152064  # logits_tokens=None: every token of the micro-batch
    chunked = trainer_memory(QWEN7B, micro_batch_size=8, sequence_length=2048, logits_tokens=min(8 * 512, 1024))
    assert chunked.logits == 8 * 152064 * 1024
    assert (chunked.weights, chunked.trainable, chunked.activations) == (
        everything.weights, everything.trainable, everything.activations)
    assert everything.total - chunked.total == 8 * 152064 * (8 * 2048 - 1024)
    with pytest.raises(ValueError, match="logits_tokens must be >= 0"):
        trainer_memory(QWEN7B, micro_batch_size=1, sequence_length=16, logits_tokens=-1)


def test_the_configs_estimate_counts_one_chunk_of_response_logits(tmp_path, model_dir):
    shape = ModelShape.from_dir(model_dir)
    for overrides, tokens in ((["trainer.logits_chunk_tokens=64"], 64),
                              (["trainer.micro_batch_size=2", "trainer.max_response_length=16"], 2 * 16)):
        cfg = config_for(tmp_path, model_dir, *overrides)
        t = cfg.trainer_for(cfg.policies[0].name)
        assert tokens == min(t.micro_batch_size * t.max_response_length, t.logits_chunk_tokens)
        assert gpu.trainer_memory_for(cfg, model_dir).logits == 8 * shape.vocab_size * tokens


def test_vllms_share_is_what_the_trainer_and_the_margin_leave_within_bounds():
    assert vllm_memory_share(total_bytes=80 * GIB, trainer_bytes=20 * GIB) == 0.72  # (80 - 20 - 2) / 80
    assert vllm_memory_share(total_bytes=24 * GIB, trainer_bytes=23 * GIB) == 0.1
    assert vllm_memory_share(total_bytes=80 * GIB, trainer_bytes=0) == 0.9
    with pytest.raises(ValueError, match="total_bytes must be positive"):
        vllm_memory_share(total_bytes=0, trainer_bytes=1)


def test_devices_default_to_shared_on_one_gpu_and_apart_on_several():
    assert device_plan(gpus=0) == gpu.DevicePlan(serving=[], trainer=[])
    one = device_plan(gpus=1)
    assert (one.serving, one.trainer, one.shared) == ([0], [0], True)
    two = device_plan(gpus=2)
    assert (two.serving, two.trainer, two.shared) == ([0], [1], False)
    assert device_plan(gpus=4).trainer == [1, 2, 3]
    assert device_plan(gpus=4, serving=[2, 3]).trainer == [0, 1]
    assert device_plan(gpus=4, trainer=[0, 1]).serving == [2]
    assert device_plan(gpus=2, trainer=[0, 1]).serving == [0]  # the trainer named every GPU: vLLM shares the first
    with pytest.raises(ValueError, match=r"serving.devices must list CUDA device indices 0..1 .* found \[2\]"):
        device_plan(gpus=2, serving=[2])
    with pytest.raises(ValueError, match="this machine has no GPU"):
        device_plan(gpus=0, trainer=[0])
    assert gpu.replica_devices([0, 1, 2, 3], servers=2, index=1) == [2, 3]
    assert gpu.replica_devices([0], servers=2, index=1) == [0]


# --- the command lines and environments -----------------------------------------------------------------------------

def test_cpu_command_line_is_unchanged(tmp_path, model_dir):
    cfg = config_for(tmp_path, model_dir)
    assert vllm.vllm_argv(cfg, port=8000, machine=CPU) == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "base", "--host", "127.0.0.1", "--port", "8000", "--dtype", "float32",
        "--max-model-len", "2048", "--enforce-eager", "--block-size", "32", "--disable-uvicorn-access-log"]
    assert vllm.vllm_env(cfg, machine=CPU) == {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def test_an_api_key_in_extra_args_reaches_vllm_through_its_environment_not_its_command_line(tmp_path, model_dir):
    """``ps`` shows every user of the host a process's command line: a vLLM ``--api-key`` given in serving.extra_args
    goes to vLLM as VLLM_API_KEY (vLLM 0.32 takes its key from there when no --api-key is given), and the config that
    the runs table and the project log record hides it."""
    from lightning_core.common.redact import redacted, redacted_argv

    for given in (["--api-key", "SECRET-vllm-6d0e"], ["--api-key=SECRET-vllm-6d0e"], ["--api_key", "SECRET-vllm-6d0e"],
                  ["--api-key", "SECRET-old", "--api-key", "SECRET-vllm-6d0e"]):  # the last one counts, as in vLLM
        cfg = config_for(tmp_path, model_dir, f"serving.extra_args={json.dumps(['--max-num-seqs', '8', *given])}")
        argv = vllm.vllm_argv(cfg, port=8000, machine=CPU)
        assert "SECRET-" not in " ".join(argv) and argv[-2:] == ["--max-num-seqs", "8"], argv
        assert vllm.vllm_env(cfg, machine=CPU)["VLLM_API_KEY"] == "SECRET-vllm-6d0e"
        assert "SECRET-" not in json.dumps(redacted(cfg.model_dump(mode="json"))), given
        assert "SECRET-" not in " ".join(redacted_argv(["--set", f"serving.extra_args={json.dumps(given)}"]))
    with pytest.raises(ServiceError, match="one key"):
        vllm.vllm_argv(config_for(tmp_path, model_dir, 'serving.extra_args=["--api-key", "a", "b"]'), port=8000, machine=CPU)


def test_sleep_mode_is_refused_on_cpu(tmp_path, model_dir):
    with pytest.raises(ServiceError, match="serving.sleep_mode needs vLLM on a GPU"):
        vllm.vllm_argv(config_for(tmp_path, model_dir, "serving.sleep_mode=true"), port=8000, machine=CPU)


def test_one_shared_gpu_gives_vllm_what_the_trainer_leaves(tmp_path, model_dir):
    machine = Machine(gpus=1, cpu_count=16, gpu_total_bytes=24 * GIB)
    cfg = config_for(tmp_path, model_dir)
    argv = vllm.vllm_argv(cfg, port=8000, machine=machine)
    need = gpu.trainer_memory_for(cfg, model_dir)
    share = vllm_memory_share(total_bytes=24 * GIB, trainer_bytes=need.total)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == f"{share:g}"
    assert 0.1 <= share < 0.9
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert "--enable-lora" in argv  # adapters on GPU
    assert "--enforce-eager" not in argv and "--block-size" not in argv and "--enable-sleep-mode" not in argv
    assert vllm.vllm_env(cfg, machine=machine)["CUDA_VISIBLE_DEVICES"] == "0"
    # a bigger micro-batch needs more of the device: vLLM gets less
    bigger = config_for(tmp_path, model_dir, "trainer.micro_batch_size=16")
    bigger_argv = vllm.vllm_argv(bigger, port=8000, machine=machine)
    assert float(bigger_argv[bigger_argv.index("--gpu-memory-utilization") + 1]) < share
    # the key wins over the estimate
    fixed = vllm.vllm_argv(config_for(tmp_path, model_dir, "serving.gpu_memory_utilization=0.35"), port=8000, machine=machine)
    assert fixed[fixed.index("--gpu-memory-utilization") + 1] == "0.35"


def test_one_shared_gpu_with_sleep_mode(tmp_path, model_dir):
    machine = Machine(gpus=1, cpu_count=16, gpu_total_bytes=80 * GIB)
    cfg = config_for(tmp_path, model_dir, "serving.sleep_mode=true")
    argv = vllm.vllm_argv(cfg, port=8000, machine=machine)
    assert "--enable-sleep-mode" in argv and "--gpu-memory-utilization" in argv
    env = vllm.vllm_env(cfg, machine=machine)
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "0"  # /sleep and /wake_up need it


def test_two_gpus_give_vllm_the_first_and_the_trainer_the_second(tmp_path, model_dir, monkeypatch):
    from lightning_core.trainer.train import trainer_device

    machine = Machine(gpus=2, cpu_count=16)
    cfg = config_for(tmp_path, model_dir, "trainer.device=cuda")
    argv = vllm.vllm_argv(cfg, port=8000, machine=machine)
    assert "--gpu-memory-utilization" not in argv  # a device of its own: vLLM's default
    assert vllm.vllm_env(cfg, machine=machine)["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    device, trainer_cfg = trainer_device(cfg, cfg.trainer)
    assert device == torch.device("cuda", 1) and trainer_cfg.devices == [1]
    # explicit lists, several replicas, and the parent's own CUDA_VISIBLE_DEVICES mapped through
    cfg = config_for(tmp_path, model_dir, "trainer.device=cuda", "serving.devices=[2, 3]", "serving.replicas=2")
    machine = Machine(gpus=4, cpu_count=16, visible=("4", "5", "6", "7"))
    assert [vllm.vllm_env(cfg, machine=machine, server=i)["CUDA_VISIBLE_DEVICES"] for i in (0, 1)] == ["6", "7"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert trainer_device(cfg, cfg.trainer)[1].devices == [0, 1]
    assert vllm.server_index(cfg, "vllm1") == 1
    # vLLM attached elsewhere (serving.urls): every GPU here is the trainer's
    attached = config_for(tmp_path, model_dir, "trainer.device=cuda", "serving.urls=[http://elsewhere:8000]")
    assert trainer_device(attached, attached.trainer) == (torch.device("cuda", 0), attached.trainer.model_copy(update={"devices": [0, 1, 2, 3]}))


def test_replicas_sharing_a_gpu_split_vllms_share(tmp_path, model_dir):
    cfg = config_for(tmp_path, model_dir, "serving.replicas=2", "serving.devices=[0]", "trainer.devices=[1]")
    argv = vllm.vllm_argv(cfg, port=8000, machine=Machine(gpus=2, cpu_count=16), server=1)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45"


def test_servers_start_side_by_side_on_cpu_and_on_gpus_only_where_they_share_no_device(tmp_path, model_dir):
    cfg = config_for(tmp_path, model_dir, "serving.replicas=3")
    assert vllm.start_waves(cfg, [0, 1, 2], machine=CPU) == [[0, 1, 2]]
    apart = config_for(tmp_path, model_dir, "serving.replicas=2", "serving.devices=[0, 1]", "trainer.devices=[2]")
    assert vllm.start_waves(apart, [0, 1], machine=Machine(gpus=3, cpu_count=16)) == [[0, 1]]
    shared = config_for(tmp_path, model_dir, "serving.replicas=3", "serving.devices=[0]", "trainer.devices=[1]")
    assert vllm.start_waves(shared, [0, 1, 2], machine=Machine(gpus=2, cpu_count=16)) == [[0], [1], [2]]


# --- sleep around the train stage -----------------------------------------------------------------------------------

class _FakeVllm(http.server.BaseHTTPRequestHandler):
    calls: list[str] = []

    def do_POST(self):  # noqa: N802
        self.calls.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_vllm():
    _FakeVllm.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeVllm.calls
    server.shutdown()


def _train_stage(cfg, url, monkeypatch, calls):
    from lightning_core.epoch import stages
    from lightning_core.epoch.context import RunContext
    from lightning_core.epoch.stack import Stack
    from lightning_core.trainer import train as trainer

    during = []
    monkeypatch.setattr(stages.ep, "sampling_counts", lambda catalog, run_id, epoch: {})
    monkeypatch.setattr(trainer, "train_policies", lambda config, **kw: during.extend(calls) or [])
    stack = Stack(collector=Service("collector", "http://c", "http://c/h"), replicas=[Service("vllm0", url, f"{url}/health")])
    stages.train(RunContext(config=cfg, catalog=None, stack=stack), run_id="r", epoch=0)
    return during


def test_sleep_mode_puts_vllm_to_sleep_for_the_train_stage_and_wakes_it(tmp_path, model_dir, fake_vllm, monkeypatch):
    url, calls = fake_vllm
    during = _train_stage(config_for(tmp_path, model_dir, "serving.sleep_mode=true"), url, monkeypatch, calls)
    assert during == ["/sleep?level=1"]
    assert calls == ["/sleep?level=1", "/wake_up"]


def test_without_sleep_mode_the_train_stage_leaves_vllm_alone(tmp_path, model_dir, fake_vllm, monkeypatch):
    url, calls = fake_vllm
    _train_stage(config_for(tmp_path, model_dir), url, monkeypatch, calls)
    assert calls == []
