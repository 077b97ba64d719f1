"""Dense projections y = x W^T: F.linear (`naive`), and on the CPU oneDNN with pre-packed bf16 weights."""
