"""The prompt, defined once: its text, the special tokens and chat template of Qwen2-Audio, and the
token layout of a rendered prompt with its answers (the paper's prompt; label words per corpus in
datasets/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import PldistillError

SYSTEM_PROMPT = "You are a helpful assistant."
USER_PROMPT = (
    "Please identify the emotion of this audio clip, then choose one word from [{labels}] as your answer."
)

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
END_OF_TURN = "<|im_end|>"

# Qwen2-Audio's chat format, written for the tiny preset (real checkpoints bring their own template).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% set audio_count = namespace(n=0) %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}{% set audio_count.n = audio_count.n + 1 %}"
    "Audio {{ audio_count.n }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user_prompt(labels: Sequence[str]) -> str:
    return USER_PROMPT.format(labels=", ".join(labels))


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of the chat prompt around the audio, and of each answer (label tokens + end of turn).
    Rendered once with the processor's own chat template, so any Qwen2-Audio processor works."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    labels: tuple[str, ...]
    answers: tuple[tuple[int, ...], ...]
    audio_token_id: int
    pad_id: int
    text: str

    @classmethod
    def from_processor(cls, processor, labels: Sequence[str], audio_token: str = AUDIO_TOKEN,
                       end_of_turn: str = END_OF_TURN) -> "PromptLayout":
        """`audio_token` and `end_of_turn`: the model family's (families.AudioLLM.prompt)."""
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "audio", "audio": "clip"}, {"type": "text", "text": user_prompt(labels)}]},
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        tokenizer = processor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        audio_id = tokenizer.convert_tokens_to_ids(audio_token)
        if ids.count(audio_id) != 1:
            raise PldistillError(f"the processor's chat template must place exactly one {audio_token}; got {ids.count(audio_id)}")
        at = ids.index(audio_id)
        eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        answers = tuple(tuple(tokenizer(label, add_special_tokens=False)["input_ids"]) + (eot,) for label in labels)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
        return cls(tuple(ids[:at]), tuple(ids[at + 1 :]), tuple(labels), answers, audio_id, pad, text)

    def prompt_ids(self, n_audio: int) -> list[int]:
        return [*self.prefix, *([self.audio_token_id] * n_audio), *self.suffix]

    def answer_ids(self, label: str) -> tuple[int, ...]:
        return self.answers[self.labels.index(label)]
