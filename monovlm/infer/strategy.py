"""The protocol between `generate` and a decoding strategy (`monovlm.infer.decoding`): a transform of each step's
next-token logits that may run auxiliary forwards of its own.

```
run = strategy.start(model, input_ids, attention_mask, prefill_inputs, max_new_tokens)   # before the main prefill
logits = run.process(main_logits)                   # after the main prefill: logits for the first sampled token
logits = run.process(main_logits, fed_tokens)       # after each main decode forward, with the tokens it was fed
```
"""

from __future__ import annotations

import torch


class StrategyRun:
    """The per-generation state of a strategy (its auxiliary branches)."""

    def process(self, logits: torch.Tensor, fed_tokens: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class DecodingStrategy:
    """A transform of next-token logits that may run auxiliary forwards. `start` is called once per generation,
    before the main prefill."""

    def start(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefill_inputs: dict | None,
              max_new_tokens: int) -> StrategyRun:
        raise NotImplementedError
