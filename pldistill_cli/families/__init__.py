"""Teacher families: what the pipeline needs from an audio LLM (AudioLLM), and the registry that finds a
model's family by its config's model_type (family_of).

forward.py (features, encoder, projector, LLM, head, attention capture, label scoring) and models.py
(building, assembling a student, LoRA, loading, saving) reach a model's insides through its family, as do
cache-teacher, scoring and predict. A new family of audio LLMs is one module: a subclass of AudioLLM,
registered (tests/test_families.py defines one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import PldistillError
from ..prompt import AUDIO_TOKEN, END_OF_TURN, PromptLayout


class AudioLLM(ABC):
    """One family of audio LLMs: an audio encoder (features + mask -> X [B, T, D_enc], lengths T), a linear
    projector (X -> Z = X W^T + b [B, T, D_llm]: the pipeline's AW-CKA works in encoder space through W, b),
    and a causal LLM body that reads the prompt's embeddings with Z in its audio slots, then an output head.
    The LLM body is a transformers decoder (inputs_embeds or input_ids, attention_mask, position_ids, a KV
    cache; returns last_hidden_state): forward.py runs it the same way for every family."""

    name: ClassVar[str]  # in messages, e.g. "Qwen2-Audio"
    model_types: ClassVar[tuple[str, ...]]  # config.model_type of its models
    encoder_types: ClassVar[tuple[str, ...]]  # config.model_type of its audio encoders' configs
    processor_class: ClassVar[type]  # its processors (tokenizer, feature extractor, chat template)
    model_class: ClassVar[Any]  # what loads a saved model: model_class.from_pretrained(folder, dtype=...)
    encoder_prefix: ClassVar[str]  # the audio encoder's weight names in a checkpoint, model. prefix removed
    lora_targets: ClassVar[str]  # regex of the LLM's linear layers that take LoRA, by module path
    projector_lora: ClassVar[str]  # regex of the projector's linear layer, by module path
    projector_name: ClassVar[str]  # the projector's module name (peft modules_to_save)
    audio_token: ClassVar[str] = AUDIO_TOKEN  # the prompt's audio placeholder, repeated once per audio step
    end_of_turn: ClassVar[str] = END_OF_TURN  # ends every answer

    # --- the processor side: features of the audio, audio steps, the prompt

    @abstractmethod
    def audio_features(self, processor, waves: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Encoder input features [B, ...] padded to the encoder window, and their frame mask [B, F]."""

    @abstractmethod
    def audio_steps(self, feature_mask: Tensor) -> Tensor:
        """The number T of encoder output steps (audio tokens) per clip, from the frame mask."""

    def prompt(self, processor, labels: Sequence[str]) -> PromptLayout:
        """The prompt's token layout, rendered with the processor's own chat template."""
        return PromptLayout.from_processor(processor, labels, self.audio_token, self.end_of_turn)

    # --- configs: building, assembling and loading models

    @abstractmethod
    def encoder_config(self, config) -> Any:
        """The audio encoder's config inside a model's config."""

    @abstractmethod
    def audio_token_id(self, config) -> int:
        """The id of the audio placeholder token, from a model's config."""

    @abstractmethod
    def new_encoder_config(self, spec: dict[str, Any], window_seconds: int) -> Any:
        """An audio encoder config from a preset's spec, for a `window_seconds` input window."""

    @abstractmethod
    def new_processor(self, window_seconds: int, tokenizer, chat_template: str) -> Any:
        """A processor for a preset: the feature extractor for a `window_seconds` window and `tokenizer`."""

    @abstractmethod
    def assemble(self, encoder_config, llm_config, audio_token_id: int) -> torch.nn.Module:
        """A randomly initialised model of the family from its parts' configs (config objects or dicts)."""

    def load(self, folder, dtype: torch.dtype) -> torch.nn.Module:
        """A saved model of the family, its weights in `dtype`."""
        return self.model_class.from_pretrained(folder, dtype=dtype)

    # --- a model's parts

    @abstractmethod
    def encoder(self, model) -> torch.nn.Module:
        """The audio encoder (frozen in students, shared with the teacher)."""

    @abstractmethod
    def projector(self, model) -> torch.nn.Linear:
        """The projector's linear map X -> Z (its W and b are what the cache stores of the teacher)."""

    @abstractmethod
    def llm(self, model) -> torch.nn.Module:
        """The LLM body: a transformers decoder without its head."""

    @abstractmethod
    def head(self, model) -> torch.nn.Module:
        """The output head: last hidden states -> logits."""

    # --- computations

    @abstractmethod
    def encode(self, model, features: Tensor, feature_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output X [B, T_max, D_enc] and lengths T [B], padding masked as the family masks it."""

    def project(self, model, encoded: Tensor) -> Tensor:
        """Projector output Z [B, T_max, D_llm]."""
        return self.projector(model)(encoded)

    @abstractmethod
    def attention_layers(self, model) -> list[torch.nn.Module]:
        """The LLM's self-attention modules, in layer order (forward hooks read their inputs)."""

    @abstractmethod
    def queries_keys(self, module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, float]:
        """From an attention module's forward inputs: its queries and keys [B, H, S, d] as its scores read
        them (positions encoded, keys repeated to every query head) and the score scale."""


FAMILIES: dict[str, AudioLLM] = {}  # model_type (of a model or of its encoder config) -> its family


def register(family: AudioLLM) -> AudioLLM:
    """Make `family` the one for its model types and encoder types."""
    for model_type in (*family.model_types, *family.encoder_types):
        FAMILIES[model_type] = family
    return family


def known() -> str:
    """The registered families, for messages: `qwen2_audio (Qwen2-Audio)`."""
    families = list(dict.fromkeys(FAMILIES.values()))
    return " or ".join(f"{'/'.join(f.model_types)} ({f.name})" for f in families)


def family_of(thing, where: str = "model") -> AudioLLM:
    """The family of a model, a config, a model_type or a processor; another one is a one-line error that
    names `where` and the known families."""
    model_type = thing if isinstance(thing, str) else getattr(getattr(thing, "config", thing), "model_type", None)
    if model_type is not None:
        if model_type in FAMILIES:
            return FAMILIES[model_type]
        raise PldistillError(f"{where}: a `{model_type}` checkpoint, expected {known()}")
    for family in dict.fromkeys(FAMILIES.values()):
        if isinstance(thing, family.processor_class):
            return family
    raise PldistillError(f"{where}: a `{type(thing).__name__}` processor, expected the processor of {known()}")


from . import qwen2_audio  # noqa: E402,F401  (registers Qwen2-Audio)
