"""PRIOR-style token weights (Chen et al. 2025, "Prioritizing Image-Related Tokens"): the next-token loss leans on
the tokens a text-only prior cannot predict — the ones the image has to supply.

PRIOR's prior is a separate text-only LLM trained on the captions. Here it is the model itself with every image
blanked (a constant grey image, no gradients): nothing more to train, and it follows the model through training, so
an answer its wording alone predicts (a yes/no prior) weighs less the better the wording predicts it. Each labelled
token gets (1 - p_blind(token)) ** power, normalised to mean 1 over the micro-batch's labelled tokens (the loss keeps
its scale; with power 0 every weight is 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monovlm.model.vlm import IGNORE_INDEX, EncoderFreeVLM


@torch.no_grad()
def prior_token_weights(model: EncoderFreeVLM, input_ids: torch.Tensor, labels: torch.Tensor,
                        images: list[torch.Tensor] | None, attention_mask: torch.Tensor | None,
                        power: float, turn_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Weights (B, T-1) aligned with the shifted targets: 0 where there is no label. `turn_ids` as the batch has them
    (isolated turns), so the blind pass reads what the training pass reads."""
    blank = [torch.zeros_like(image) for image in images] if images else None
    hidden = model.hidden_states(input_ids, blank, attention_mask, turn_ids=turn_ids)  # (B, T, C)
    targets = labels[:, 1:]  # (B, T-1)
    selected = targets != IGNORE_INDEX
    weights = torch.zeros(targets.shape, dtype=torch.float32, device=labels.device)
    if not bool(selected.any()):
        return weights
    logits = F.linear(hidden[:, :-1][selected], model.decoder.output_weight).float()  # (N, V)
    blind_p = logits.softmax(dim=-1).gather(1, targets[selected][:, None]).squeeze(1)  # (N,)
    selected_weights = (1.0 - blind_p).clamp(min=1e-6) ** power
    weights[selected] = selected_weights / selected_weights.mean()
    return weights
