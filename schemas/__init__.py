"""Every message jetfleet sends, as msgspec Structs: one place to find any shape."""
