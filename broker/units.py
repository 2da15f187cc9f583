"""Units and defaults of the VRAM accounting, defined once: every process counts memory in MiB, and
usable VRAM = total × (1 − reserve) everywhere (`GpuSnapshot.usable_mib`, NVML telemetry, the sim GPU)."""

MIB = 1 << 20                   # bytes in a MiB
VRAM_RESERVE_FRACTION = 0.1     # kept back from every GPU for the CUDA context and fragmentation
