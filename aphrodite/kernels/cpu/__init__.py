"""C kernels for the CPU decode path (``cpu_ops.c``), built with the system C compiler on first use."""
