"""ARM itself: activation statistics, rotations, schedules, formulations, the streaming iteration,
layer-by-layer execution, diagnostics and the GPU memory estimate. Registered as merge method ``arm``."""
