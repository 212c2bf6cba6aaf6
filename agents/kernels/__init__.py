"""Kernel evaluation: verify and profile Triton candidates against PyTorch references.

Bus-independent. The worker's kernel capabilities call:

- `agents.kernels.evaluate.evaluate(kind, reference_source, candidate_source, ...)`
  -> `schemas.kernels.KernelOutcome` (sandboxed child process per evaluation);
- `agents.kernels.library.list_problems()` / `load_problem(name)`;
- `agents.kernels.generate.template_variants(...)` / `mutate(...)`;
- `agents.kernels.llm.generate_candidate(...)` when `llm_configured()`.

Nothing here imports torch at import time except the child-side modules
(`child`, `guards`, `compare`), which run only inside the sandbox.
"""
