"""Batched answer generation: left-padded batches of similar length, answers matched back to prompt ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from common.progress import progress_bar
from participant.learner import MAX_ANSWER_CHARS as MAX_ANSWER_CHARS
from participant.learner import GeneratedAnswer as GeneratedAnswer
from participant.models import (
    LocalModel,
    ModelError,
    eos_token_ids,
    max_positions,
    prompt_token_ids,
)
from schemas.messages import GenerationParams


def generate_answers(
    lm: LocalModel,
    prompts: Sequence[tuple[str, str]],
    params: GenerationParams,
    batch_size: int = 16,
    progress: bool = False,
) -> list[GeneratedAnswer]:
    """Answer `(prompt_id, text)` pairs; the result follows the input order, whatever the batching.

    Greedy when `params.temperature == 0`, else nucleus sampling seeded with `params.seed`.
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [_fit_prompt(lm, prompt_token_ids(lm, text), params.max_new_tokens) for _, text in prompts]
    # Longest first: rows of similar length waste little padding, and a too-large batch fails at once.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    config = _generation_config(lm, params)
    stop_ids = set(eos_token_ids(lm))
    answers: dict[int, GeneratedAnswer] = {}
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with (
        torch.inference_mode(),
        torch.random.fork_rng(devices=[]),
        progress_bar(progress, len(batches), "generating") as advance,
    ):
        torch.manual_seed(params.seed)
        lm.model.eval()
        for rows in batches:
            input_ids, attention_mask = _left_pad([encoded[i] for i in rows], int(config.pad_token_id))
            output = lm.model.generate(
                input_ids=input_ids.to(lm.device),
                attention_mask=attention_mask.to(lm.device),
                generation_config=config,
            )
            generated = output.sequences[:, input_ids.shape[1] :]
            token_logprobs = _token_logprobs(output.logits, generated).tolist()
            for row, new_tokens, logprobs in zip(rows, generated.tolist(), token_logprobs, strict=True):
                kept, completion_tokens = _cut_at_stop(new_tokens, stop_ids)
                text = str(lm.tokenizer.decode(kept, skip_special_tokens=True)).strip()[:MAX_ANSWER_CHARS]
                logprob = sum(logprobs[:completion_tokens]) / completion_tokens if completion_tokens else None
                answers[row] = GeneratedAnswer(
                    prompts[row][0], text, len(encoded[row]), completion_tokens, logprob
                )
            advance("")
    return [answers[i] for i in range(len(prompts))]


def _token_logprobs(logits: tuple[torch.Tensor, ...], generated: torch.Tensor) -> torch.Tensor:
    """[batch, steps]: the log-probability of each generated token under the model's unprocessed logits
    (so a sampling temperature does not change how sure the model was)."""
    steps = torch.stack(logits, dim=1).float()  # [batch, steps, vocab]
    chosen = generated[:, : steps.shape[1]].unsqueeze(-1)
    # log softmax at the chosen token only, without a second [batch, steps, vocab] tensor
    return (steps.gather(-1, chosen).squeeze(-1) - torch.logsumexp(steps, dim=-1)).cpu()


def _generation_config(lm: LocalModel, params: GenerationParams) -> GenerationConfig:
    stop_ids = eos_token_ids(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=params.max_new_tokens,
        do_sample=False,
        pad_token_id=int(pad),
        eos_token_id=stop_ids or None,
        output_logits=True,  # the answer's own log-probability rides along with it (Answer.logprob)
        return_dict_in_generate=True,
    )
    if params.temperature > 0:
        config.do_sample = True
        config.temperature = params.temperature
        config.top_p = params.top_p
        config.top_k = 0  # the wire names only top_p; a hidden top-k default would change the sampler
    return config


def _fit_prompt(lm: LocalModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Keep the prompt's end when prompt plus answer would overrun the model's context."""
    context = max_positions(lm)
    if context is None:
        return ids
    room = context - max_new_tokens
    if room < 1:
        raise ModelError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {lm.model_id}")
    return ids[len(ids) - room :] if len(ids) > room else ids


def _left_pad(rows: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the left so every row's last prompt token sits at the end, where generation continues."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _cut_at_stop(new_tokens: list[int], stop_ids: set[int]) -> tuple[list[int], int]:
    """The answer's tokens before the first stop token, and how many tokens were really generated."""
    for position, token in enumerate(new_tokens):
        if token in stop_ids:
            return new_tokens[:position], position + 1
    return new_tokens, len(new_tokens)
