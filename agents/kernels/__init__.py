"""Kernel evaluation: verify and profile Triton candidates against PyTorch references.

Bus-independent. The worker's kernel capabilities call:

- `agents.kernels.evaluate.evaluate(kind, reference_source, candidate_source, ...)`
  -> `schemas.kernels.KernelOutcome` (a trusted evaluator process and a sandboxed
  candidate process per evaluation; docs/sandbox.md);
- `agents.kernels.isolation.available()` -> `IsolationInfo` (probe at worker start);
- `agents.kernels.library.list_problems()` / `load_problem(name)`;
- `agents.kernels.generate.template_variants(...)` / `mutate(...)`;
- `agents.kernels.llm.generate_candidate(...)` when `llm_configured()`.

Nothing here imports torch at import time except the modules of the trusted
evaluator (`trusted`, `compare`) and of the candidate's sandbox (`child`,
`guards`), which run only in those processes.
"""
