"""An lmms-eval adapter: expose a monovlm model through lmms-eval's (simple) model interface.

lmms-eval is an optional dependency. When it is installed, `MonovlmLMMS` subclasses its `lmms` base class and is
registered as model "monovlm", so `python -m lmms_eval --model monovlm --model_args pretrained=PATH ...` works once
this module is imported (e.g. through lmms-eval's plugin path). Without it the class still works on any request
objects shaped like lmms-eval's `Instance` (an `.args` tuple), which is how the tests drive it.

Request contracts (lmms-eval's simple models):
  generate_until: args = (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> answer text
  loglikelihood:  args = (context, doc_to_target, doc_to_visual, doc_id, task, split) -> (summed log p, is_greedy)
`doc_to_visual(doc)` returns a list of PIL images; the document is `self.task_dict[task][split][doc_id]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monovlm.eval.protocol import LoglikelihoodRequest, ModelRunner, Query
from monovlm.infer.generate import GenerationConfig

try:  # pragma: no cover - depends on the optional package
    from lmms_eval.api.model import lmms as _LmmsBase
    from lmms_eval.api.registry import register_model as _register_model
except ImportError:  # lmms-eval not installed: a plain base with the attributes its evaluator sets
    _LmmsBase = object
    _register_model = None


class MonovlmLMMS(_LmmsBase):
    def __init__(self, pretrained: str | None = None, runner: ModelRunner | None = None, batch_size: int | str = 8,
                 device: str = "cpu", **_ignored: Any):
        if _LmmsBase is not object:
            super().__init__()
        if runner is None:
            if pretrained is None:
                raise ValueError("MonovlmLMMS needs pretrained=PATH (a monovlm model folder) or a runner")
            runner = ModelRunner.load(pretrained, device=device, batch_size=int(batch_size))
        self.runner = runner
        self.task_dict: dict[str, Any] = getattr(self, "task_dict", {})  # filled by lmms-eval's evaluator

    # lmms-eval reads these
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def _visuals(self, doc_to_visual, doc_id, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals or []) if v is not None]
        return [v.convert("RGB") if hasattr(v, "convert") else self.runner.load_image(v) for v in visuals]

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        outputs = []
        for request in requests:  # settings differ per request, so each is its own (small) batch
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            until = gen_kwargs.get("until") or []
            settings = GenerationConfig(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32)),
                temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0) if gen_kwargs.get("do_sample") else 0.0,
                top_p=gen_kwargs.get("top_p") if gen_kwargs.get("do_sample") else None,
                stop_strings=[until] if isinstance(until, str) else list(until),
            )
            query = Query(context, self._visuals(doc_to_visual, doc_id, task, split))
            outputs += self.runner.generate([query], settings)
        return outputs

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        batch = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = doc_to_target(self.task_dict[task][split][doc_id]) if callable(doc_to_target) else doc_to_target
            batch.append(LoglikelihoodRequest(context, str(continuation),
                                              self._visuals(doc_to_visual, doc_id, task, split)))
        return self.runner.loglikelihood(batch)

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("monovlm's lmms-eval adapter answers single-round requests only")


if _register_model is not None:  # pragma: no cover
    MonovlmLMMS = _register_model("monovlm")(MonovlmLMMS)
