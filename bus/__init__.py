"""The substrate every jetfleet component stands on: one connection, one topology,
one codec, one publish helper, one consumer loop, one lease implementation."""
