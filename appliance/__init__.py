"""armdi runtime: frames, transport, nodes, source, allocator, CLI."""
