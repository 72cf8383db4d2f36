"""Numerical kernels the approximators call: Batch-OMP (``omp``) and its bfloat16
correlation screen (``omp_screen``)."""
