"""The small models shipped inside the package, so every command works offline with no ``--model``.

They are ordinary checkpoint folders under ``phi_core/assets/``, found through ``importlib.resources`` so they
work from an installed wheel as well as from a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from phi_core.config import PhiConfig
from phi_core.errors import CheckpointError

# The shape of the embedded models (scripts/train_tiny.py trains it): the real Phi vocabulary and tokenizer, a
# small tied-embedding decoder.
TINY_CONFIG = PhiConfig(
    vocab_size=51200,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    partial_rotary_factor=0.5,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    bos_token_id=50256,
    eos_token_id=50256,
    torch_dtype="float16",
)

# name -> (folder under assets/, what it is)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "tiny": ("tiny", "causal LM trained on the Python standard library"),
    "tiny-classifier": ("tiny-classifier", "sequence classifier: which kind of stdlib snippet"),
    "tiny-tagger": ("tiny-tagger", "token tagger: Python token kinds"),
}


def embedded_model_path(name: str) -> Path | None:
    """The folder of embedded model ``name``, or None when ``name`` is not an embedded model's name."""
    if name not in EMBEDDED_MODELS:
        return None
    folder = Path(str(resources.files("phi_core") / "assets" / EMBEDDED_MODELS[name][0]))
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"embedded model {name!r} is not built in this installation (run `make tiny-model`)")
    return folder
