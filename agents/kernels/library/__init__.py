"""The built-in problem library.

Each problem is a directory `<name>/` holding `reference.py` (KernelBench shape:
`Model`, `get_inputs()`, `get_init_inputs()`) and `candidate.py` (a correct
Triton `ModelNew` whose launch parameters are module-level UPPERCASE ints the
generator may rewrite; a `# tune: a, b, c` comment lists the values allowed).
Shapes are small and fp32 so a verify runs in seconds under Triton's
interpreter. The sources are read as text, never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

_ROOT = Path(__file__).resolve().parent

# name -> (family, description). The directory of each entry holds the sources.
_PROBLEMS: dict[str, tuple[str, str]] = {
    "add": ("elementwise", "Elementwise addition of two (64, 256) tensors."),
    "mul": ("elementwise", "Elementwise product of two (64, 256) tensors."),
    "relu": ("activation", "ReLU of a (64, 256) tensor."),
    "gelu": ("activation", "GELU (tanh approximation) of a (64, 256) tensor."),
    "silu": ("activation", "SiLU / swish of a (64, 256) tensor."),
    "leaky_relu": ("activation", "Leaky ReLU (slope 0.05) of a (64, 256) tensor."),
    "sum_dim": ("reduction", "Sum over the last dim of a (32, 200) tensor."),
    "mean_dim": ("reduction", "Mean over the last dim of a (32, 200) tensor."),
    "softmax": ("softmax", "Softmax over the last dim of a (32, 200) tensor."),
    "log_softmax": ("softmax", "Log-softmax over the last dim of a (32, 200) tensor."),
    "layernorm": ("normalization", "LayerNorm(200) with affine parameters on (32, 200)."),
    "rmsnorm": ("normalization", "RMSNorm(200) with a learned scale on (32, 200)."),
    "matmul": ("matmul", "Matrix product (64, 48) @ (48, 80)."),
    "linear_relu": ("fused", "relu(x @ W^T + b): Linear(64, 96) + ReLU on (48, 64)."),
    "add_relu": ("fused", "relu(a + b) on two (64, 256) tensors."),
    "scale_clamp": ("fused", "clamp(x * 0.5, -2, 3) on a (64, 256) tensor."),
}


@dataclass(frozen=True)
class ProblemInfo:
    name: str
    family: str
    description: str
    reference_source: str
    candidate_source: str


def problem_names() -> list[str]:
    return sorted(_PROBLEMS)


@cache
def load_problem(name: str) -> ProblemInfo:
    """A library problem by name; KeyError naming the valid ones otherwise."""
    if name not in _PROBLEMS:
        raise KeyError(f"unknown kernel problem {name!r}; valid: {', '.join(problem_names())}")
    family, description = _PROBLEMS[name]
    folder = _ROOT / name
    return ProblemInfo(
        name=name,
        family=family,
        description=description,
        reference_source=(folder / "reference.py").read_text(),
        candidate_source=(folder / "candidate.py").read_text(),
    )


def list_problems() -> list[ProblemInfo]:
    return [load_problem(name) for name in problem_names()]
