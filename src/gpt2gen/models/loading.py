"""One loader for every notebook, script and test: a Hub id or a local folder in, model and tokenizer out.

Resolution of the model name, in order: the `name` argument, the `GPT2GEN_MODEL` environment
variable, then the default `gpt2`. Only the default falls back: when GPT-2 is neither cached nor
reachable, the embedded offline model is loaded with a one-line notice. A model the user named
and that cannot be loaded raises `ModelLoadError`, whose message says what, why and how to fix it.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..files import cache_root
from ..progress import progress_bars_off
from . import embedded
from .embedded import DEFAULT_MODEL, MODEL_ENV_VAR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what, why and how to fix it."""


class HubUnreachable(ModelLoadError):
    """The model is not in the local cache and the Hugging Face Hub cannot be reached."""


@dataclass
class LoadedModel:
    """A model ready for generation, with the facts needed to label its output honestly."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    requested: str
    is_embedded: bool

    @property
    def is_gpt2(self) -> bool:
        return self.model.config.model_type == "gpt2"

    @property
    def label(self) -> str:
        """Who produced a text or a number: print this next to every result."""
        if self.is_embedded:
            return f"{embedded.EMBEDDED_DISPLAY_NAME} (embedded offline model, not GPT-2)"
        if self.is_gpt2:
            return self.name
        return f"{self.name} ({self.model.config.model_type}, not GPT-2)"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_length(self) -> int:
        return context_length(self.model)


def context_length(model: PreTrainedModel) -> int:
    """Longest sequence (prompt + generated tokens) the model accepts."""
    config = model.config
    for field in ("n_positions", "max_position_embeddings"):
        if (value := getattr(config, field, None)) is not None:
            return int(value)
    raise ValueError(f"cannot tell the context length of a {config.model_type} model")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a device name (use auto, cpu, cuda, cuda:0 or mps)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available; ask for device 'cpu' or 'auto'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available; ask for device 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto") -> torch.dtype:
    """`auto` is float32, the reference precision; bfloat16 and float16 are opt-in."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


HUB_PROBE_TIMEOUT_S = 3.0
HUB_PROBE_MEMORY_S = 60.0  # an unreachable Hub is tried again after this long
_last_failed_probe: dict[str, float] = {}
_probe_lock = threading.Lock()


def hub_offline() -> bool:
    """True when the Hub is switched off (HF_HUB_OFFLINE) or cannot be reached within a few seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    return not _hub_reachable(constants.ENDPOINT)


def _hub_reachable(endpoint: str) -> bool:
    """Probe the Hub the way its client connects (its HTTP session: proxies from HTTPS_PROXY and the like).

    huggingface_hub's own calls retry an unreachable host for ~25 s; this one request answers within
    HUB_PROBE_TIMEOUT_S. Any HTTP answer means reachable. A failure is remembered for
    HUB_PROBE_MEMORY_S only, so a notebook or demo that lives on tries again later.
    """
    from huggingface_hub.utils import get_session

    with _probe_lock:
        failed = _last_failed_probe.get(endpoint)
        if failed is not None and time.monotonic() - failed < HUB_PROBE_MEMORY_S:
            return False
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # any transport error: DNS, refused, proxy, TLS, timeout
        with _probe_lock:
            _last_failed_probe[endpoint] = time.monotonic()
        return False
    with _probe_lock:
        _last_failed_probe.pop(endpoint, None)
    return True


def _is_local_path(name: str) -> bool:
    if Path(name).expanduser().exists():
        return True
    # Hub ids are `name` or `owner/name`; anything else shaped like a path is meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def _check_local(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"cannot load model {str(path)!r}: no such folder or file. Check the path, or pass a Hub id such as 'gpt2'."
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"cannot load model {str(path)!r}: it is a file, not a model folder (a folder saved with "
                "save_pretrained, or a .gguf file, is expected)."
            )
        return
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load model {str(path)!r}: the folder has no config.json, so it is not a saved model. "
            "Save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"cannot load model {str(path)!r}: the folder has a config.json but no weights (*.safetensors). "
            "Save the model with model.save_pretrained(folder), which writes model.safetensors."
        )


def _from_pretrained(source: str | Path, dtype: torch.dtype, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with progress_bars_off():  # a "Loading weights" bar for a one-second load is noise
        return _from_pretrained_quiet(source, dtype, **kwargs)


def _from_pretrained_quiet(
    source: str | Path, dtype: torch.dtype, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if str(source).endswith(".gguf"):
        path = Path(source)
        kwargs["gguf_file"] = path.name
        source = path.parent
    else:
        kwargs["use_safetensors"] = True
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False, **kwargs)
    kwargs.pop("use_safetensors", None)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    return model, tokenizer


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        return _from_pretrained(repo_id, dtype, local_files_only=True)
    except OSError:
        pass  # not in the local cache: try the Hub itself
    if hub_offline():
        raise HubUnreachable(
            f"cannot load model {repo_id!r}: it is not in the local Hugging Face cache and the Hub cannot be "
            "reached (offline, or HF_HUB_OFFLINE is set). Connect once to download it, pass a local model "
            f"folder, or use the embedded offline model with {MODEL_ENV_VAR}={embedded.EMBEDDED_ALIAS}."
        )
    try:
        return _from_pretrained(repo_id, dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {repo_id!r} from the Hugging Face Hub: {_first_line(exc)} "
            "Check the spelling (e.g. gpt2, gpt2-medium, openai-community/gpt2) or pass a local folder."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> None:
    """Eval mode on the device; pad with EOS on the left (GPT-2 has no pad token)."""
    model.eval()
    model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = context_length(model)
    # The decoding loops mask padding themselves; `config.pad_token_id` is left unset, because with it a
    # model warns "We strongly recommend passing in an `attention_mask`" whenever an unpadded input starts
    # or ends with EOS (every run without a prompt: GPT-2 pads with its EOS, which is also its BOS).
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_embedded(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> LoadedModel:
    """Load the embedded offline model (SmolLM2-135M-Instruct); it is not GPT-2.

    A damaged cache (truncated weights, broken config, missing tokenizer) is deleted and converted again.
    """
    root = cache_root()
    if root.exists() and not root.is_dir():
        raise ModelLoadError(
            f"cannot prepare the embedded offline model: the cache folder {str(root)!r} is a file, not a folder; "
            "point GPT2GEN_CACHE at a folder (or unset it) or move that file away"
        )
    target_dtype = resolve_dtype(dtype)
    try:
        folder = embedded.ensure_converted()
        try:
            model, tokenizer = _load_embedded_folder(folder, target_dtype)
        except Exception as exc:  # a damaged cache: rebuild it once
            print(f"gpt2gen: the embedded model's cache {folder} is damaged ({_first_line(exc)}); rebuilding it",
                  file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
            folder = embedded.ensure_converted()
            try:
                model, tokenizer = _load_embedded_folder(folder, target_dtype)
            except Exception as again:
                raise ModelLoadError(
                    f"cannot load the embedded offline model from its cache {folder}: {_first_line(again)}; "
                    "delete that folder and try again"
                ) from again
    except embedded.EmbeddedModelMissing as exc:
        raise ModelLoadError(f"cannot load the embedded offline model: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(
            f"cannot prepare the embedded offline model in {root}: {exc.strerror or exc}; set GPT2GEN_CACHE to a "
            "writable folder"
        ) from exc
    _prepare(model, tokenizer, resolve_device(device))
    return LoadedModel(model, tokenizer, embedded.EMBEDDED_DISPLAY_NAME, embedded.EMBEDDED_ALIAS, is_embedded=True)


def _load_embedded_folder(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tokenizer = _from_pretrained(folder, dtype)
    _check_tokenizer(tokenizer, str(folder))
    return model, tokenizer


def requested_model_name(name: str | None = None) -> tuple[str, bool]:
    """The model to load and whether the user chose it (argument or environment) rather than the default."""
    if name:
        return name, True
    if env := os.environ.get(MODEL_ENV_VAR):
        return env, True
    return DEFAULT_MODEL, False


def load_model(
    name: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    announce: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for generation.

    `name` is a Hub id, a local folder, a `.gguf` file or `embedded`; None means $GPT2GEN_MODEL,
    else `gpt2`. Falls back to the embedded model only for the default, with a notice on stderr
    when `announce` is set; raises `ModelLoadError` for a named model that cannot be loaded.
    """
    requested, explicit = requested_model_name(name)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype)
    if requested == embedded.EMBEDDED_ALIAS:
        return load_embedded(target_device, target_dtype)

    if _is_local_path(requested):
        path = Path(requested).expanduser()
        _check_local(path)
        try:
            model, tokenizer = _from_pretrained(path, target_dtype)
        except Exception as exc:  # OSError, ValueError, SafetensorError (truncated weights), JSON errors, ...
            raise ModelLoadError(
                f"cannot load model {requested!r}: {_first_line(exc)} ({type(exc).__name__}); the files look damaged "
                "or incomplete: save the model again with save_pretrained"
            ) from exc
        _check_tokenizer(tokenizer, requested)
    else:
        try:
            model, tokenizer = _load_hub(requested, target_dtype)
        except HubUnreachable:
            if explicit:
                raise
            loaded = load_embedded(target_device, target_dtype)
            if announce:
                print(
                    f"gpt2gen: GPT-2 ({requested!r}) is not cached and the Hugging Face Hub cannot be reached, "
                    f"so the embedded offline model {embedded.EMBEDDED_DISPLAY_NAME} (not GPT-2) was loaded; "
                    "to use GPT-2, connect once to the internet (it is cached afterwards) or set "
                    f"{MODEL_ENV_VAR} to a local GPT-2 folder.",
                    file=sys.stderr,
                )
            return loaded
    _prepare(model, tokenizer, target_device)
    return LoadedModel(model, tokenizer, requested, requested, is_embedded=False)


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    # A folder without tokenizer files loads an empty tokenizer that silently ignores every prompt.
    if len(tokenizer) < 2:
        raise ModelLoadError(
            f"cannot load model {source!r}: the folder has no tokenizer (tokenizer.json, or vocab.json and "
            "merges.txt). Save it beside the weights with tokenizer.save_pretrained(folder)."
        )
