"""The `jetfleet` verbs, one module per area; each module has `register(sub, common)`.

A new area adds its module here (and nothing else in ops/cli.py changes).
"""

COMMAND_MODULES = (
    "ops.commands.jobs",
    "ops.commands.fleet",
    "ops.commands.config",
    "ops.commands.objects",
    "ops.commands.resources",
    "ops.commands.query",
    "ops.commands.nodes",
    "ops.commands.simulate",
    "ops.commands.call",
    "ops.commands.creds",
)
