"""Kernel jobs from a script, with the field names of the kernel-generation client
people know (`op_name`, `job_type`, `backend`, `arch`, `dsl`, `framework`, ...).

    from agents.kernels.sdk import KernelClient

    fleet = KernelClient()
    job_id = fleet.submit_job(op_name="softmax", job_type="evolve", max_rounds=2)
    status = fleet.wait_for_completion(job_id, timeout=1800)
"""

from __future__ import annotations

from typing import Any

from sdk.sync import SyncClient

JOB_TYPES = ("single", "evolve", "generate", "verify", "profile")


class KernelClient(SyncClient):
    def submit_job(self, op_name: str, task_desc: str = "", job_type: str = "single",
                   backend: str | None = None, arch: str | None = None, dsl: str = "triton",
                   framework: str = "torch", workflow: str | None = None,
                   **payload: Any) -> str:
        """`job_type` single/evolve/generate/verify/profile -> capability kernel.<job_type>.

        backend and arch select the devices that evaluate: labels of the job
        itself for verify/profile, of its child evaluations otherwise (the
        evolver that generates candidates runs anywhere).
        """
        if job_type not in JOB_TYPES:
            raise ValueError(f"job_type {job_type!r}: one of {', '.join(JOB_TYPES)}")
        labels = {k: v for k, v in (("backend", backend), ("arch", arch)) if v}
        user = payload.pop("user", None)
        body: dict[str, Any] = {"problem": op_name, "dsl": dsl.split("_")[0], **payload}
        capability = {"type": f"kernel.{job_type}"}
        if job_type in ("verify", "profile"):
            capability.update(labels)
        else:
            body["framework"] = framework
            if task_desc:
                body["task_desc"] = task_desc
            if workflow:
                body["workflow"] = workflow
            if labels and job_type in ("single", "evolve"):
                body["child_labels"] = labels
        return self.submit(capability, body, user=user)
