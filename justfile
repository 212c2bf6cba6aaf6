# jetfleet tasks. `just test` is what CI runs.

default:
    @just --list

# install, start an embedded fleet and run real jobs end to end
demo:
    jetfleet demo

# embedded nats-server plus every component, until Ctrl-C
up *ARGS:
    jetfleet up {{ARGS}}

# the default test run (soak and GPU tests left out), two test files at a time
test:
    python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# slow soak and chaos runs
soak:
    python -m pytest -q -m soak -p no:cacheprovider

# GPU-only tests (compiled Triton, device-event timing): run on a machine with CUDA
gpu:
    python -m pytest -q -m gpu -p no:cacheprovider

lint:
    ruff check bus schemas sdk services agents ops tests examples
    mypy

# every benchmark, each beside its raw baseline
bench:
    jetfleet bench dispatch
    jetfleet bench leases
    jetfleet bench kernels
