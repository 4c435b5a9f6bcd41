"""The data plane: the worker node's receive-compute-send loop and the source."""
