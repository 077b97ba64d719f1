"""The token-block size that paging and the DeltaNet chunk share (torch-free: the scheduler imports it).

A KV block holds BLOCK_SIZE tokens, and the chunked gated delta rule runs BLOCK_SIZE-token chunks, so
a full cached KV block and a DeltaNet state recorded at a chunk boundary always end at the same
absolute position: a prefix cache can resume from either without recomputation.
"""
BLOCK_SIZE = 64
