"""The wire: activation frames, control messages, and the pynng sockets that carry them."""
