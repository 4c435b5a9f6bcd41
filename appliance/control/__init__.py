"""The control plane: where the boundaries go (the allocator's exact optimum) and, as they
arrive, the controller that moves them, the failure detector and the membership."""
