"""Keeping a video's questions from sinking each other in the answer stage.

- `too_long`: a question the model cannot take (more tokens than `answer.max_question_tokens`, or a
  prompt whose longest MoRef reference with `answer.max_new_tokens` passes the model's context) is
  found from its text and the frames' token count alone, before any model work for it, and becomes
  its own error row.
- `answer_halving_on_oom`: a batch of questions that runs out of memory is split in halves and each
  half retried, down to single questions; only a question that runs out of memory alone fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Result = TypeVar("Result")


def too_long(question_tokens: int, max_question_tokens: int, sequence_tokens: int | None = None,
             max_new_tokens: int = 0, context_tokens: int | None = None) -> str | None:
    """Why a question is too long for the model (an error detail naming the count and the limit), or
    None. `sequence_tokens`: the longest sequence one attention pass holds, the text with the frames
    of the longest MoRef reference (the whole prompt without MoRef: the references are what let a
    long video fit the context); None: not known yet (checked again once it is)."""
    if question_tokens > max_question_tokens:
        return f"the question is {question_tokens} tokens, over answer.max_question_tokens ({max_question_tokens})"
    if sequence_tokens is not None and context_tokens and sequence_tokens + max_new_tokens > context_tokens:
        return (f"the prompt is {sequence_tokens} tokens in its longest reference (frames included), which with "
                f"answer.max_new_tokens ({max_new_tokens}) is over the model's context of {context_tokens} tokens")
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU out-of-memory error, or the CPU allocator's (a RuntimeError in torch)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def answer_halving_on_oom(answer: Callable[[Sequence[int]], Sequence[Result]], members: Sequence[int]
                          ) -> tuple[dict[int, Result], dict[int, BaseException]]:
    """Run `answer` (questions -> their results, in order) on `members`; a batch that runs out of
    memory is split in halves, each retried the same way. Returns (results, out-of-memory errors of
    single questions), both by question. Any other exception propagates (it is the batch's error)."""
    try:
        return dict(zip(members, answer(members))), {}
    except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raised
        if not is_out_of_memory(exc):
            raise
        if len(members) == 1:
            return {}, {members[0]: exc}
    # leaving the except clause dropped the error and its traceback (which holds the failed batch's
    # tensors): their memory goes back before the halves run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(members) // 2
    results, failed = answer_halving_on_oom(answer, members[:half])
    more_results, more_failed = answer_halving_on_oom(answer, members[half:])
    return {**results, **more_results}, {**failed, **more_failed}
