"""Fleet-wide services: dispatcher, monitor, generator/evolver, query API."""
