"""Speed-ups of the renderer that change how it runs, never what it computes: regional torch.compile of the DiT
blocks (compile.py) and block swap for GPUs smaller than an expert (block_swap.py)."""
