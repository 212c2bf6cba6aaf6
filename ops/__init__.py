"""Operating jetfleet: the client SDK, the CLI, the launcher and the benchmarks."""
