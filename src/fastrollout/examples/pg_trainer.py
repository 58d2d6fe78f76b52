"""A minimal policy-gradient trainer for the example RL loop: one PyTorch step on a batch of
experiences with GRPO advantages, then a checkpoint folder the engines can load.

It trains the same Hugging Face causal LM the engines sample from (the tiny model in the
tests; any small model on a GPU). The loss is the plain on-policy policy gradient,
``-sum(advantage * log p(token)) / tokens`` over the response tokens the action mask marks
(the model's own tokens), which is what GRPO reduces to with one update per batch.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..experience import ExperienceBatch

# Files of a checkpoint folder that are not weights: copied into every new checkpoint.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "chat_template.jinja")


class PolicyGradientTrainer:
    def __init__(self, checkpoint: str | Path, output: str | Path, *, lr: float = 1e-3,
                 pad_token_id: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.source = Path(checkpoint)
        self.output = Path(output)
        self.model = AutoModelForCausalLM.from_pretrained(self.source, torch_dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.pad_token_id = pad_token_id if pad_token_id is not None else \
            (self.model.config.pad_token_id or 0)
        self.steps = 0

    def step(self, batch: ExperienceBatch) -> dict[str, float]:
        """One optimizer step on ``batch`` (its ``advantages`` column set by the ``grpo``
        operator). Returns the loss and the mean log-prob of the response tokens before the
        step, under the trainer's weights."""

        if batch.column("advantages") is None:
            raise ValueError("PolicyGradientTrainer.step needs advantages: add the 'grpo' "
                             "operator to pipeline.operators")
        padded = batch.to_padded(self.pad_token_id, return_tensors="pt")
        logp = self._response_logprobs(padded)
        mask = padded["action_mask"].float()
        advantages = padded["advantages"].float()
        tokens = mask.sum().clamp(min=1.0)
        loss = -(advantages * logp * mask).sum() / tokens
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return {"train/loss": float(loss.detach()), "train/tokens": float(tokens),
                "train/logprob/mean": float((logp.detach() * mask).sum() / tokens)}

    def save(self) -> Path:
        """Write the current weights as a checkpoint folder (``step_<n>``) and return it."""
        folder = self.output / f"step_{self.steps}"
        self.model.save_pretrained(folder, safe_serialization=True)
        for name in _TOKENIZER_FILES:
            if (self.source / name).exists():
                shutil.copy(self.source / name, folder / name)
        return folder

    def logprobs(self, batch: ExperienceBatch) -> Any:
        """Per-token log-probs of each response (numpy, right-padded) under the current
        weights."""
        import torch

        with torch.no_grad():
            return self._response_logprobs(
                batch.to_padded(self.pad_token_id, return_tensors="pt")).numpy()

    def _response_logprobs(self, padded: dict) -> Any:
        import torch

        input_ids = padded["input_ids"].long()
        prompt = input_ids.shape[1] - padded["action_mask"].shape[1]
        logits = self.model(input_ids=input_ids, attention_mask=padded["attention_mask"].long(),
                            position_ids=padded["position_ids"].long()).logits
        # The logits at position t predict token t + 1: the response tokens are predicted by
        # the positions just before them.
        logp = torch.log_softmax(logits[:, prompt - 1:-1].float(), dim=-1)
        return logp.gather(-1, input_ids[:, prompt:, None]).squeeze(-1)
