"""Prompts exactly as a model family was evaluated with, and user text that stays text.

A prompt is a list of pieces: `Control` text the template owns (it may name special tokens such as
`<|im_start|>`), `User` text (questions, system prompts), and one `VIDEO` marker where the visual
tokens go. `encode_prompt` tokenizes the pieces so that only control text can yield special or
added tokens: a question containing `<video>` or `<|im_end|>` is read as those characters.

Templates (`PROMPT_TEMPLATES`):
- `llava_vid`: LLaVA-NeXT's `qwen_1_5` conversation (ChatML, default system "You are a helpful
  assistant.") with the media placeholder on its own line before the question, as lmms-eval's
  `llava_vid` model prompts LLaVA-Video in its published evaluations.
- `hf`: the chat template transformers writes into converted LlavaOnevision checkpoints: the same
  ChatML turns, but no system turn unless one is given.

Questions are worded per benchmark before they reach a template: `multiple_choice_question` and
`open_ended_question` give the lmms-eval wording of Video-MME, MLVU and LongVideoBench, and the
short-answer post-prompt of open-ended video QA (ActivityNet-QA).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Control:
    """Text owned by the template: special tokens in it are recognised."""

    text: str


@dataclass(frozen=True)
class User:
    """Text from the user: always plain text, whatever it contains."""

    text: str


class _Video:
    def __repr__(self) -> str:
        return "VIDEO"


VIDEO = _Video()  # where the visual tokens go; exactly once per prompt

LLAVA_VID_SYSTEM = "You are a helpful assistant."


def _chatml_pieces(question: str, system: str) -> list:
    """A ChatML system turn (none when `system` is ""), then a user turn of the video on its own
    line and the question, then the assistant-turn start."""
    pieces = [Control("<|im_start|>system\n"), User(system), Control("<|im_end|>\n")] if system else []
    return pieces + [
        Control("<|im_start|>user\n"), VIDEO, Control("\n"), User(question),
        Control("<|im_end|>\n<|im_start|>assistant\n"),
    ]


def llava_vid_pieces(question: str, system_prompt: str | None) -> list:
    """LLaVA-NeXT `conv_templates["qwen_1_5"]` (SeparatorStyle.CHATML), `<image>\n` + question as
    lmms-eval's llava_vid model sends it; the default system turn is "You are a helpful assistant."
    and "" leaves the system turn out, as the conversation does with an empty system."""
    return _chatml_pieces(question, LLAVA_VID_SYSTEM if system_prompt is None else system_prompt)


def hf_pieces(question: str, system_prompt: str | None) -> list:
    """transformers' LlavaOnevision chat template (convert_llava_onevision_weights_to_hf.py):
    `<|im_start|>ROLE\n`, media as `<video>\n`, the text, `<|im_end|>\n`; a system turn only
    when one is given."""
    return _chatml_pieces(question, system_prompt or "")


PromptTemplate = Literal["llava_vid", "hf"]
PROMPT_TEMPLATES: dict[PromptTemplate, Callable[[str, str | None], list]] = {
    "llava_vid": llava_vid_pieces, "hf": hf_pieces}


def prompt_pieces(template: str, question: str, system_prompt: str | None) -> list:
    """The pieces of `template` for one question; `system_prompt` None is the template's default."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template](question, system_prompt)


def render_text(pieces: list, video_token: str = "<video>") -> str:
    """The prompt as one string, for display: the video marker becomes `video_token`."""
    return "".join(video_token if p is VIDEO else p.text for p in pieces)


def control_token_ids(tokenizer) -> dict[str, int]:
    """Every token the tokenizer matches before BPE: special tokens and other added tokens."""
    tokens = dict(tokenizer.get_added_vocab())
    for token in tokenizer.all_special_tokens:
        tokens.setdefault(token, tokenizer.convert_tokens_to_ids(token))
    return tokens


def plain_text_ids(tokenizer, text: str) -> list[int]:
    """`text` through the tokenizer's normalizer, pre-tokenizer and model only, skipping the
    added-token matching that would turn `<|im_end|>` (special or not) into its id. For text
    without added tokens this is exactly what `tokenizer(text, add_special_tokens=False)` gives."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} has no `tokenizers` backend; a fast tokenizer is needed")
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    words = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
    return [token.id for word, _ in words for token in backend.model.tokenize(word)]


def _encode_side(tokenizer, pieces: list, controls: dict[str, int], splitter: re.Pattern | None) -> list[int]:
    """Control text is cut at its control tokens; the text between them and the user text around
    it are tokenized together as plain text, as whole-prompt tokenization would."""
    ids: list[int] = []
    run: list[str] = []
    forbidden = set(controls.values())

    def flush():
        if run:
            plain = plain_text_ids(tokenizer, "".join(run))
            leaked = forbidden.intersection(plain)
            if leaked:  # only possible where a model vocabulary holds a control token as a plain token
                names = sorted(t for t, i in controls.items() if i in leaked)
                raise ValueError(f"prompt text tokenizes to control token(s) {names}")
            ids.extend(plain)
            run.clear()

    for piece in pieces:
        if isinstance(piece, User):
            run.append(piece.text)
            continue
        parts = splitter.split(piece.text) if splitter is not None else [piece.text]
        for k, part in enumerate(parts):
            if k % 2:  # the splitter's capture group: a control token
                flush()
                ids.append(controls[part])
            elif part:
                run.append(part)
    flush()
    return ids


def encode_prompt(tokenizer, pieces: list):
    """(prefix_ids, suffix_ids): the token ids (long tensors) before and after the video marker."""
    import torch  # here, so that question wording below stays importable without torch

    marks = [i for i, p in enumerate(pieces) if p is VIDEO]
    if len(marks) != 1:
        raise ValueError(f"a prompt holds exactly one video marker, got {len(marks)}")
    controls = control_token_ids(tokenizer)
    # Longest first, so a control token that extends another is matched whole.
    names = sorted(controls, key=len, reverse=True)
    splitter = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
    before, after = pieces[:marks[0]], pieces[marks[0] + 1:]
    return tuple(torch.tensor(_encode_side(tokenizer, side, controls, splitter), dtype=torch.long)
                 for side in (before, after))


# --- Question wording per benchmark (lmms-eval's doc_to_text for each task) ---

OPTION_LETTERS = string.ascii_uppercase

VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
                        "Respond with only the letter (A, B, C, or D) of the correct option.")
LETTER_DIRECTLY = "Answer with the option's letter from the given choices directly."


def _videomme(question: str, options: list[str]) -> str:
    lines = [f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join([VIDEOMME_INSTRUCTION, question, *lines, "The best answer is:"])


def _mlvu(question: str, options: list[str]) -> str:
    # lmms-eval's MLVU questions carry their options as "(A) ...\n" lines, each ending in "\n".
    listed = "".join(f"({OPTION_LETTERS[i]}) {option}\n" for i, option in enumerate(options))
    return f"\n{question}\n{listed}\nOnly give the best option.\n\nBest option: ("


def _longvideobench(question: str, options: list[str]) -> str:
    lines = [f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join([question, *lines, LETTER_DIRECTLY]) + "\n"


# The benchmark wordings the job config offers (questions.multiple_choice_prompt, open_ended_prompt).
MultipleChoiceStyle = Literal["videomme", "mlvu", "longvideobench"]
OpenEndedStyle = Literal["none", "short_answer"]
MULTIPLE_CHOICE_PROMPTS: dict[MultipleChoiceStyle, Callable[[str, list[str]], str]] = {
    "videomme": _videomme, "mlvu": _mlvu, "longvideobench": _longvideobench}
OPEN_ENDED_PROMPTS: dict[OpenEndedStyle, str] = {
    "none": "", "short_answer": " Answer the question using a single word or phrase."}


def multiple_choice_question(question: str, options: list[str], style: MultipleChoiceStyle) -> str:
    """The question and its lettered options, worded as benchmark `style` is evaluated."""
    if not options or len(options) > len(OPTION_LETTERS):
        raise ValueError(f"a multiple-choice question needs 1 to {len(OPTION_LETTERS)} options, got {len(options)}")
    return MULTIPLE_CHOICE_PROMPTS[style](question, list(options))


def open_ended_question(question: str, style: OpenEndedStyle) -> str:
    """The question with open-ended post-prompt `style` appended ("none": unchanged)."""
    return question + OPEN_ENDED_PROMPTS[style]
