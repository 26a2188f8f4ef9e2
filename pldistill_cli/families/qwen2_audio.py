"""Qwen2-Audio (Qwen2AudioForConditionalGeneration): a Whisper-style audio tower, a linear projector and
a Qwen2 LLM. The pipeline's first family, and the one the presets build."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                          WhisperFeatureExtractor)
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

from . import AudioLLM, register
from .qwen2_llm import Qwen2Decoder

ENCODER_RATE = 16000  # Whisper-style log-mels: 25 ms windows, 10 ms hops at 16 kHz


class Qwen2Audio(Qwen2Decoder, AudioLLM):
    name = "Qwen2-Audio"
    model_types = ("qwen2_audio",)
    encoder_types = ("qwen2_audio_encoder",)
    processor_class = Qwen2AudioProcessor
    model_class = Qwen2AudioForConditionalGeneration
    encoder_prefix = "audio_tower."
    # LoRA as the paper configures it, on every LLM layer, by module path: the audio encoder has q/k/v
    # projections with the same short names and must stay frozen (and shared with the teacher).
    lora_targets = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    projector_lora = r"model\.multi_modal_projector\.linear"
    projector_name = "multi_modal_projector"

    def audio_features(self, processor, waves: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Log-mel features padded to the encoder window, and their frame mask (clips beyond it are cut)."""
        out = processor.feature_extractor(
            list(waves), sampling_rate=processor.feature_extractor.sampling_rate, padding="max_length", truncation=True,
            return_attention_mask=True, return_tensors="pt",
        )
        return out["input_features"], out["attention_mask"]

    def audio_steps(self, feature_mask: Tensor) -> Tensor:
        """Conv stride 2, then average pooling by 2."""
        frames = feature_mask.sum(-1)
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1

    def encoder_config(self, config) -> Qwen2AudioEncoderConfig:
        return config.audio_config

    def audio_token_id(self, config) -> int:
        return config.audio_token_id

    def new_encoder_config(self, spec: dict[str, Any], window_seconds: int) -> Qwen2AudioEncoderConfig:
        return Qwen2AudioEncoderConfig(num_mel_bins=128, max_source_positions=window_seconds * 50, **spec)

    def new_processor(self, window_seconds: int, tokenizer, chat_template: str) -> Qwen2AudioProcessor:
        features = WhisperFeatureExtractor(
            feature_size=128, sampling_rate=ENCODER_RATE, hop_length=160, n_fft=400, chunk_length=window_seconds
        )
        return Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=chat_template)

    def assemble(self, encoder_config, llm_config, audio_token_id: int) -> Qwen2AudioForConditionalGeneration:
        config = Qwen2AudioConfig(audio_config=encoder_config, text_config=llm_config, audio_token_index=audio_token_id)
        return Qwen2AudioForConditionalGeneration(config)

    def encoder(self, model) -> torch.nn.Module:
        return model.model.audio_tower

    def projector(self, model) -> torch.nn.Linear:
        return model.model.multi_modal_projector.linear

    def llm(self, model) -> torch.nn.Module:
        return model.model.language_model

    def head(self, model) -> torch.nn.Module:
        return model.lm_head

    def encode(self, model, features: Tensor, feature_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Masked exactly as Qwen2-Audio masks it."""
        tower = model.model.audio_tower
        feat_lengths, lengths = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        steps = (features.shape[-1] - 2) // 2 + 1
        valid = (torch.arange(steps, device=features.device)[None] < feat_lengths[:, None]).long()
        dummy = torch.zeros(features.shape[0], steps, 1, dtype=tower.conv1.weight.dtype, device=features.device)
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=valid)
        hidden = tower(features, attention_mask=mask).last_hidden_state
        return hidden, lengths.to(hidden.device)


QWEN2_AUDIO = register(Qwen2Audio())
