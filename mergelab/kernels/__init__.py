"""How merge operators run: the kernel seam (`select`), the compiled and chunked kernels by role,
and the non-finite check of merged tensors."""
