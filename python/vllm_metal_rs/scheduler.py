"""vLLM's schedulers, taught to finish the requests a step could not serve.

The engine never lets one request's failure take the engine down: it forgets the request and
reports it in the step's output (`MetalModelRunnerOutput.failed_requests`). These subclasses
finish such requests with vLLM's error status, which the API returns as an HTTP 500 for that
request alone, while the engine goes on serving the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput


SCHEDULER_CLS = "vllm_metal_rs.scheduler.MetalScheduler"
ASYNC_SCHEDULER_CLS = "vllm_metal_rs.scheduler.MetalAsyncScheduler"

_EMPTY = torch.empty(0, dtype=torch.float32)


@dataclass
class MetalModelRunnerOutput(ModelRunnerOutput):
    # req_id -> why the engine could not serve it this step (it has forgotten the request).
    failed_requests: dict[str, str] = field(default_factory=dict)


class _FinishesFailedRequests:
    """Mixed into vLLM's schedulers: failed requests finish with FinishReason.ERROR."""

    grammar_compile_error_reqs: set[str]
    requests: dict[str, Any]

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> Any:
        # The engine has logged each failure and its reason.
        failed = getattr(model_runner_output, "failed_requests", None)
        pooling: set[str] = set()
        if failed:
            # update_from_output finishes the requests of this set with FINISHED_ERROR and an
            # output for each (vLLM's path for requests whose grammar could not be compiled).
            known = [r for r in failed if r in self.requests]
            self.grammar_compile_error_reqs.update(known)
            pooling = {r for r in known if self.requests[r].pooling_params is not None}
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        if pooling:
            # The front end reads a pooling request's output without a detokenizer: an error
            # output needs a pooling tensor, which stays empty (vLLM 0.32 carries no error
            # message for pooling requests).
            for engine_outputs in outputs.values():
                for o in engine_outputs.outputs:
                    if o.request_id in pooling:
                        o.pooling_output = _EMPTY
        return outputs


class MetalScheduler(_FinishesFailedRequests, Scheduler):
    pass


class MetalAsyncScheduler(_FinishesFailedRequests, AsyncScheduler):
    pass
