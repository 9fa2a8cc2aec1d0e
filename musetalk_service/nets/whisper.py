"""The whisper-tiny encoder and its feature extractor, from the `whisper/` transformers folder.

Only the encoder is used (spec §1), so only the file's `encoder.*` tensors are put into a
`WhisperEncoder`; the decoder is never built. The pipeline asks for all hidden states: the
embeddings plus one per layer, i.e. `encoder_layers + 1` feature sets per audio frame.

transformers 5.x rejects encoder input whose time axis is not exactly 3000 mel frames (30 s):
pad or cut each window to `N_MEL_FRAMES` before calling the encoder.
"""

from __future__ import annotations

from pathlib import Path

from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from musetalk_service.nets.layout import weight_file
from musetalk_service.nets.loading import StateDict, WeightsFileError, build_and_load, load_state_dict, read_json

N_MEL_FRAMES = 3000

# openai/whisper-tiny is saved as WhisperForConditionalGeneration ("model.encoder.*");
# a saved WhisperModel has "encoder.*". Either is accepted.
_ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def read_whisper_config(path: str | Path) -> WhisperConfig:
    """A WhisperConfig from a transformers config.json; WeightsFileError naming it if invalid."""
    data = read_json(path)
    try:
        return WhisperConfig.from_dict(data)
    # transformers validates with ValueError (e.g. token ids beyond vocab_size); bad types give TypeError.
    except (ValueError, TypeError, KeyError) as e:
        raise WeightsFileError(path, f"not a valid WhisperConfig ({e})") from e


def encoder_state(state: StateDict) -> StateDict:
    """The encoder's tensors of a whole-model whisper state dict, with the encoder prefix removed."""
    for prefix in _ENCODER_PREFIXES:
        selected = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if selected:
            return selected
    # Nothing prefixed: an encoder saved on its own. A foreign file then fails the strict key check.
    return state


def load_whisper_encoder(models_dir: str | Path) -> WhisperEncoder:
    """Build the WhisperEncoder from `whisper/config.json` and load the encoder tensors strictly, on CPU."""
    config = read_whisper_config(weight_file("whisper_config").path(models_dir))
    entry = weight_file("whisper")
    weights = entry.find(models_dir) or entry.path(models_dir)
    return build_and_load(lambda: WhisperEncoder(config), encoder_state(load_state_dict(weights)), weights)


def load_feature_extractor(models_dir: str | Path) -> WhisperFeatureExtractor:
    """The WhisperFeatureExtractor of `whisper/preprocessor_config.json` (log-mel, 80 bins, 16 kHz)."""
    path = weight_file("whisper_preprocessor").path(models_dir)
    read_json(path)  # a missing or broken file is reported by name, not as a transformers lookup error
    try:
        return WhisperFeatureExtractor.from_pretrained(str(path.parent), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsFileError(path, f"not a valid WhisperFeatureExtractor config ({e})") from e
